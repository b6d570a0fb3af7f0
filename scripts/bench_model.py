"""Prefill and decode speed of the NVLM_D class on one card, beside the published code and the floor.

Issues 8 (part 3) and 17. In one run on one device:
1. the floor: the card's measured bf16 matmul rate (8192^3, CUDA events) and memory bandwidth (a large
   device copy, bytes read + written over time); prefill FLOPs that matter for the prompt (2 x the
   linear weights each token passes through, over the ViT's real heads only, plus attention scores
   and context, logits of the last position) over the rate, and decode bytes (LLM layers + final norm
   + lm_head + one embedding row) over the bandwidth;
2. for each depth (default 4 LLM + 4 ViT layers and 40 + 45: the whole tower, and as many LLM layers
   as one H200 holds with the cache), a full-width slice of a preset (default `nvlm-d-72b`) with
   seeded random weights built on the device, and a 7-tile image prompt (a 3:2 picture: 6 tiles +
   thumbnail) in the published chat format;
3. time to first token (`generate(max_new_tokens=1)`) and decode ((t64 - t1) / 63, greedy) of: ours
   as it is (on CUDA: static cache + CUDA graph per token), ours through transformers' own loop
   (`fast_decode=False`), and with `--release-code DIR` the published remote code (its
   modeling_nvlm_d.py and siblings, imported from DIR) on the very same weight tensors;
   medians of several runs after warm-up; a prefill breakdown (ViT + projector, LLM);
4. the outputs: greedy tokens of every path against ours; bf16 logits of ours and the published code
   over the prompt plus our continuation (teacher forcing); and (on by default) an fp32 check on a
   short prompt: the greedy tokens of every path against ours through transformers' loop in fp32.

    PYTHONPATH=$PWD python3 scripts/bench_model.py --release-code .device/torch_ref_model --json out.json
    PYTHONPATH=$PWD python3 scripts/bench_model.py --device cpu --preset tiny --dtype fp32 --depths 2+2

The published code is imported as it is; what it needs from a newer transformers is shimmed here at
load time (see `load_release_code` and `build_release_model`), never by editing its files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modeling import NVLM_D_Model, build_prompt, get_config  # noqa: E402
from modeling.processing_nvlm_d import IMG_CONTEXT_TOKEN, image_to_pixel_values  # noqa: E402

TINY_TOKENIZER = REPO / "tests" / "fixtures" / "tiny-tokenizer"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUESTION = "Describe the image in detail."  # + the chat format and tile tags: 60 text tokens (Qwen2)
GRID = (3, 2)  # columns x rows of tiles: 6 tiles + the thumbnail = 7
RELEASE_FILES = (
    "configuration_intern_vit.py",
    "configuration_nvlm_d.py",
    "conversation.py",
    "modeling_intern_vit.py",
    "modeling_nvlm_d.py",
)


def main(argv: list[str] | None = None) -> dict:
    log = Log()
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    transformers.logging.set_verbosity_error()
    release = load_release_code(args.release_code) if args.release_code else None
    clock = Clock(device)
    report = header(args, device, sys.argv[1:] if argv is None else argv)
    log(f"{report['card']}, torch {report['torch']}, transformers {report['transformers']}")
    report["floor"] = measure_floor(device, dtype, clock, quick=args.quick_floor)
    log(f"floor: {report['floor']['matmul_tflops']:.1f} TFLOP/s, {report['floor']['bandwidth_tbs']:.3f} TB/s")

    report["depths"] = []
    for llm_layers, vit_layers in args.depths:
        result = bench_depth(args, llm_layers, vit_layers, release, device, dtype, clock, report, log)
        report["depths"].append(result)
        write_json(args.json, report)
    if args.fp32_check:
        report["fp32_check"] = fp32_check(args, release, device, log)
    report["wall_s"] = log.elapsed()
    write_json(args.json, report)
    print_table(report)
    return report


class Log:
    """Progress lines on stderr, with the seconds since the run started."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {message}", file=sys.stderr, flush=True)


def depth_list(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(n) for n in part.split("+")) for part in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected LLM+ViT layer pairs such as 4+4,40+45, got {text!r}")
    return pairs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nvlm-d-72b", help="modeling.presets name (default nvlm-d-72b)")
    parser.add_argument(
        "--depths",
        type=depth_list,
        default=depth_list("4+4,40+45"),
        help="LLM+ViT layer counts, comma-separated (default 4+4,40+45)",
    )
    parser.add_argument(
        "--release-code",
        type=Path,
        help="a folder holding the published NVLM-D remote code (modeling_nvlm_d.py, "
        "modeling_intern_vit.py, their configuration files and conversation.py): timed beside ours",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer folder (e.g. the release's); default: the project's tiny tokenizer, with its "
        "image-token id mapped to the config's img_context_token_id",
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="also time ours through transformers' loop with cache_implementation='static' (which "
        "compiles the decode step with torch.compile on CUDA: minutes, off by default)",
    )
    parser.add_argument(
        "--no-fp32-check",
        dest="fp32_check",
        action="store_false",
        help="skip the fp32 greedy-token check of every path (a short prompt at the first depth)",
    )
    parser.add_argument("--quick-floor", action="store_true", help="small floor measurements (smoke runs)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="after the timings of each depth, profile one generation of ours and of the published "
        "code and write the busiest kernels here (text)",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here (rewritten after each stage)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is (t(n) - t(1)) / (n - 1))")
    if args.release_code is not None:
        missing = [n for n in RELEASE_FILES if not (args.release_code / n).is_file()]
        if missing:
            parser.exit(
                2, f"{args.release_code}: not the published NVLM-D code: {', '.join(missing)} missing\n"
            )
    return args


def header(args: argparse.Namespace, device: torch.device, argv: list[str]) -> dict:
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    return {
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "command": " ".join(["scripts/bench_model.py", *argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


# -- timing ------------------------------------------------------------------------------------------


class Clock:
    """Seconds a callable takes: CUDA events on a GPU (work is asynchronous), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if not self.cuda:
            start = time.perf_counter()
            out = fn()
            return time.perf_counter() - start, out
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, out


def measure_floor(device: torch.device, dtype: torch.dtype, clock: Clock, quick: bool) -> dict:
    """The card's matmul rate and copy bandwidth: the best of 5 batches of repeated calls (median too)."""
    small = quick or device.type == "cpu"
    size, nbytes = (1024, 256 << 20) if small else (8192, 2 << 30)
    mm = matmul_seconds(device, dtype, size, clock, iters=3 if device.type == "cpu" else 20)
    copy = copy_seconds(device, nbytes, clock)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    flops = 2 * size**3
    return {
        "matmul": {"m=n=k": size, "dtype": str(dtype).removeprefix("torch."), "seconds": mm},
        "matmul_tflops": flops / min(mm) / 1e12,
        "matmul_tflops_median": flops / statistics.median(mm) / 1e12,
        "copy": {"bytes": nbytes, "seconds": copy},
        "bandwidth_tbs": 2 * nbytes / min(copy) / 1e12,  # read + written
        "bandwidth_tbs_median": 2 * nbytes / statistics.median(copy) / 1e12,
    }


def matmul_seconds(device, dtype, size: int, clock: Clock, iters: int) -> list[float]:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b, c = torch.randn_like(a), torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=c)
    return [clock(lambda: [torch.mm(a, b, out=c) for _ in range(iters)])[0] / iters for _ in range(5)]


def copy_seconds(device, nbytes: int, clock: Clock, iters: int = 5) -> list[float]:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return [clock(lambda: [dst.copy_(src) for _ in range(iters)])[0] / iters for _ in range(5)]


# -- the model and the prompt ------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(preset: str, llm_layers: int, vit_layers: int, device, dtype, seed: int) -> NVLM_D_Model:
    """Seeded random weights, created and initialised on the device in the target dtype (no copy)."""
    config = get_config(preset, llm_num_hidden_layers=llm_layers, vision_num_hidden_layers=vit_layers)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = NVLM_D_Model(config).eval()
    for layer in model.vision_model.encoder.layers:  # the release's dummy heads are exactly zero
        attn = layer.attn
        qkv = attn.qkv.weight.view(3, attn.padded_dim, -1)[:, attn.embed_dim :]
        if qkv.count_nonzero() or attn.proj.weight[:, attn.embed_dim :].count_nonzero():
            raise RuntimeError("random initialisation left a non-zero ViT dummy head")
    return model


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus a few flat rectangles: a deterministic picture of any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 17.0 + y / 23.0)], axis=-1) * 255
    for _ in range(6):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        pixels[y0 : y0 + height // 5, x0 : x0 + width // 6] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels.astype(np.uint8))


def load_tokenizer(folder: Path | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        folder or TINY_TOKENIZER, local_files_only=True, trust_remote_code=False
    )


def make_inputs(model: NVLM_D_Model, tokenizer_dir: Path | None, device: torch.device, grid=GRID) -> dict:
    """pixel_values of a picture of `grid` tiles (+ thumbnail when more than one) and the chat
    prompt's ids, on the device; pixel_values in the model's dtype, as the release's users pass them."""
    config = model.config
    size = config.image_size
    pixel_values = image_to_pixel_values(
        synthetic_image(grid[0] * size, grid[1] * size),
        image_size=size,
        max_num=config.max_dynamic_patch,
        use_thumbnail=config.use_thumbnail,
    )
    tiles = pixel_values.shape[0]
    tokenizer = load_tokenizer(tokenizer_dir)
    prompt = build_prompt(QUESTION, [tiles], config.num_image_token)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    # The tiny tokenizer's <|vision_pad|> is 989, the 72B config's 151654: use the config's id.
    image_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    input_ids[input_ids == image_id] = config.img_context_token_id
    image_tokens = int((input_ids == config.img_context_token_id).sum())
    vocab = config.llm_config.vocab_size
    if image_tokens != tiles * config.num_image_token or int(input_ids.max()) >= vocab:
        raise RuntimeError(f"bad prompt: {image_tokens} image tokens, largest id {int(input_ids.max())}")
    dtype = next(model.parameters()).dtype
    return {
        "pixel_values": pixel_values.to(device, dtype),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
    }


def describe(model: NVLM_D_Model, inputs: dict) -> dict:
    config = model.config
    ids = inputs["input_ids"]
    image_tokens = int((ids == config.img_context_token_id).sum())
    return {
        "preset_dims": {
            "llm_layers": config.llm_config.num_hidden_layers,
            "vit_layers": config.vision_config.num_hidden_layers,
            "llm_hidden": config.llm_config.hidden_size,
            "vit_hidden": config.vision_config.hidden_size,
            "vocab": config.llm_config.vocab_size,
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tiles": int(inputs["pixel_values"].shape[0]),
        "prompt_tokens": int(ids.shape[1]),
        "image_tokens": image_tokens,
        "text_tokens": int(ids.shape[1]) - image_tokens,
    }


# -- the floor: FLOPs and bytes --------------------------------------------------------------------------


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def prefill_flops(model: NVLM_D_Model, tiles: int, seq_len: int, logit_positions: int = 1) -> dict[str, int]:
    """Matmul FLOPs that matter in one prefill: 2 per weight per token through every linear layer
    (the ViT's over its real heads: the dummy heads are zero), plus attention scores and context
    (causal in the LLM), and the logits of `logit_positions` positions."""
    vit, llm = model.config.vision_config, model.config.llm_config
    patches = (vit.image_size // vit.patch_size) ** 2
    vit_tokens = patches + 1  # class token
    real_width = vit.num_attention_heads * vit.head_dim
    dummy_width = vit.num_dummy_heads * vit.head_dim
    dummy_weights = 4 * dummy_width * vit.hidden_size * vit.num_hidden_layers  # qkv rows + proj columns
    image_tokens = tiles * model.num_image_token
    attn_width = llm.num_attention_heads * llm_head_dim(llm)
    patch_weights = model.vision_model.embeddings.patch_embedding.weight.numel()
    return {
        "vit_patch_embedding": 2 * tiles * patches * patch_weights,
        "vit_linear": 2 * tiles * vit_tokens * (linear_weights(model.vision_model.encoder) - dummy_weights),
        "vit_attention": 4 * tiles * vit_tokens**2 * real_width * vit.num_hidden_layers,
        "projector": 2 * image_tokens * linear_weights(model.mlp1),
        "llm_linear": 2 * seq_len * linear_weights(model.language_model.model.layers),
        "llm_attention": 2 * seq_len * (seq_len + 1) * attn_width * llm.num_hidden_layers,
        "logits": 2 * logit_positions * model.language_model.lm_head.weight.numel(),
    }


def decode_bytes(model: NVLM_D_Model) -> dict[str, int]:
    """Weight bytes one decode step reads: every LLM layer, the final norm, lm_head, one embedding row."""
    lm = model.language_model
    size = next(lm.parameters()).element_size()
    return {
        "llm_layers": size * sum(p.numel() for p in lm.model.layers.parameters()),
        "final_norm": size * lm.model.norm.weight.numel(),
        "lm_head": size * lm.lm_head.weight.numel(),
        "embedding_row": size * lm.config.hidden_size,
    }


def kv_cache_bytes(model: NVLM_D_Model, positions: int) -> int:
    llm = model.config.llm_config
    size = next(model.parameters()).element_size()
    return 2 * llm.num_hidden_layers * positions * llm.num_key_value_heads * llm_head_dim(llm) * size


def llm_head_dim(llm) -> int:
    return getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads


def counts(model: NVLM_D_Model, inputs: dict, new_tokens: int, floor: dict) -> dict:
    tiles, seq_len = int(inputs["pixel_values"].shape[0]), int(inputs["input_ids"].shape[1])
    flops = prefill_flops(model, tiles, seq_len)
    weights = decode_bytes(model)
    rate, bandwidth = floor["matmul_tflops"] * 1e12, floor["bandwidth_tbs"] * 1e12
    vit = flops["vit_patch_embedding"] + flops["vit_linear"] + flops["vit_attention"] + flops["projector"]
    return {
        "prefill_flops": flops,
        "prefill_floor_s": sum(flops.values()) / rate,
        "vit_and_projector_floor_s": vit / rate,
        "llm_prefill_floor_s": (sum(flops.values()) - vit) / rate,
        "decode_weight_bytes": weights,
        "decode_floor_s_per_token": sum(weights.values()) / bandwidth,
        "decode_kv_bytes_mid": kv_cache_bytes(model, seq_len + new_tokens // 2),  # not in the floor
    }


# -- the published code --------------------------------------------------------------------------------


def load_release_code(folder: Path) -> types.ModuleType:
    """The published modeling_nvlm_d.py, imported from `folder` as the package `nvlm_release_code`
    (its files import each other relatively). Shim: its modeling_intern_vit.py imports timm's DropPath
    and einops' rearrange at the top but uses neither at drop-path rate 0 without flash attention;
    where those packages are missing, stand-ins that refuse to be used take their place."""
    missing_stand_ins = {
        "timm": {"timm.models": {}, "timm.models.layers": {"DropPath": _unavailable("timm.DropPath")}},
        "einops": {"einops": {"rearrange": _unavailable("einops.rearrange")}},
    }
    for package, modules in missing_stand_ins.items():
        if package not in sys.modules and importlib.util.find_spec(package) is None:
            sys.modules.setdefault(package, types.ModuleType(package))
            for name, attrs in modules.items():
                module = sys.modules.setdefault(name, types.ModuleType(name))
                for attr, value in attrs.items():
                    setattr(module, attr, value)
    name = "nvlm_release_code"
    package = types.ModuleType(name)
    package.__path__ = [str(folder.resolve())]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.modeling_nvlm_d")


def _unavailable(what: str):
    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{what} is not installed (stand-in of bench_model.py)")

    return Unavailable


def build_release_model(release: types.ModuleType, ours: NVLM_D_Model) -> nn.Module:
    """The published NVLM_D_Model with our model's parameter tensors themselves (the release layout
    is ours: the same names and shapes; no copy, no second set of weights in memory).

    Built with its parameters on the meta device (accelerate's init_empty_weights), then given ours
    with load_state_dict(assign=True); its buffers (the LLM's RoPE frequencies) go to our device.
    Shim for transformers 5.x: the published generate() hands `return_dict` and `output_hidden_states`
    (None by default) on to transformers' generate, which 5.x passes to the model's forward beside
    its own `return_dict`: a TypeError ("got multiple values for keyword argument 'return_dict'").
    A wrapper on that one instance's language_model.generate drops the two when they are None."""
    from accelerate import init_empty_weights

    config = release.NVLM_D_Config(**ours.config.to_dict())
    with init_empty_weights(include_buffers=False):
        theirs = release.NVLM_D_Model(config)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    device = next(ours.parameters()).device
    theirs.to(device).eval()
    theirs.img_context_token_id = ours.config.img_context_token_id
    lm = theirs.language_model
    plain_generate = lm.generate

    def generate(*args, **kwargs):
        for key in ("return_dict", "output_hidden_states"):
            if kwargs.get(key, 0) is None:
                kwargs.pop(key)
        return plain_generate(*args, **kwargs)

    lm.generate = generate
    return theirs


# -- the paths timed ----------------------------------------------------------------------------------


def generation_paths(model: NVLM_D_Model, theirs: nn.Module | None, args) -> dict:
    """name -> function(inputs, new_tokens) giving exactly `new_tokens` greedy tokens (EOS off)."""
    pad = model.config.llm_config.bos_token_id  # <|endoftext|>, the release's pad token
    greedy = dict(do_sample=False, eos_token_id=None, pad_token_id=pad)

    def ours(fast, **extra):
        return lambda inputs, n: model.generate(
            **inputs, max_new_tokens=n, fast_decode=fast, **greedy, **extra
        )

    paths = {"ours": ours(None), "ours, transformers loop": ours(False)}
    if args.static_cache:
        paths["ours, transformers static+compile"] = ours(False, cache_implementation="static")
    if theirs is not None:
        paths["published code"] = lambda inputs, n: theirs.generate(**inputs, max_new_tokens=n, **greedy)
    return paths


def time_generation(generate, inputs: dict, args, clock: Clock) -> dict:
    """Median time to first token and median time of `new_tokens` tokens; decode = the difference."""
    start = time.perf_counter()
    for _ in range(args.warmup):
        generate(inputs, 1)
    generate(inputs, args.new_tokens)
    warmup_s = time.perf_counter() - start

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first = [clock(lambda: generate(inputs, 1))[0] for _ in range(args.repeats)]
    full, tokens = [], None
    for _ in range(args.repeats):
        seconds, tokens = clock(lambda: generate(inputs, args.new_tokens))
        full.append(seconds)
    if tokens.shape != (1, args.new_tokens):
        raise RuntimeError(f"generate() gave {tuple(tokens.shape)} tokens, expected (1, {args.new_tokens})")
    prefill_s, full_s = statistics.median(first), statistics.median(full)
    per_token = (full_s - prefill_s) / (args.new_tokens - 1)
    return {
        "prefill_s": prefill_s,
        "prefill_runs_s": first,
        "generate_s": full_s,
        "generate_runs_s": full,
        "decode_s_per_token": per_token,
        # None: the timing noise exceeded the decode time (a busy CPU, too few repeats)
        "decode_tokens_per_s": 1 / per_token if per_token > 0 else None,
        "warmup_s": warmup_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "tokens": tokens[0].tolist(),
    }


@torch.no_grad()
def prefill_stages(model: NVLM_D_Model, theirs, inputs: dict, clock: Clock, repeats: int) -> dict:
    """Medians of the ViT + projector alone (ours on the real heads, ours on all 32, the published
    code's extract_feature) and of our LLM prefill alone (embeddings in, last-position logits out)."""
    pixels, ids = inputs["pixel_values"], inputs["input_ids"]
    embeds = model.embed_inputs(ids, pixels)

    def median(fn):
        fn()
        return statistics.median(clock(fn)[0] for _ in range(repeats))

    attentions = [layer.attn for layer in model.vision_model.encoder.layers]
    stages = {"ours_vit_and_projector_s": median(lambda: model.extract_feature(pixels))}
    for attn in attentions:  # the lever measured: the same tower computing all 32 heads
        attn.computed_heads = types.MethodType(lambda self: self.num_heads, attn)
    try:
        stages["ours_vit_and_projector_all_heads_s"] = median(lambda: model.extract_feature(pixels))
    finally:
        for attn in attentions:
            del attn.computed_heads
    stages |= {
        "ours_llm_prefill_s": median(lambda: model.language_model(inputs_embeds=embeds, logits_to_keep=1)),
    }
    if theirs is not None:
        stages["published_vit_and_projector_s"] = median(lambda: theirs.extract_feature(pixels))
    return stages


@torch.no_grad()
def teacher_forced_logits(model: NVLM_D_Model, theirs, inputs: dict, continuation: list[int]) -> dict:
    """Logits of the prompt's last position and of our continuation, from ours and (if given) from
    the published code's own ViT, projector and language model on the same ids."""
    device = inputs["input_ids"].device
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation[:-1]], device=device)], dim=1)
    keep = len(continuation)
    logits = {"ours": model(pixel_values=inputs["pixel_values"], input_ids=ids, logits_to_keep=keep).logits}
    if theirs is not None:
        features = theirs.extract_feature(inputs["pixel_values"])
        embeds = theirs.language_model.get_input_embeddings()(ids)
        selected = (ids == model.config.img_context_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(selected, features.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        out = theirs.language_model(inputs_embeds=embeds, logits_to_keep=keep)
        logits["published code"] = out.logits
    return {name: t[0].float() for name, t in logits.items()}


def compare_tokens(tokens: dict[str, list[int]], reference: str) -> dict:
    ref = tokens[reference]
    result = {}
    for name, other in tokens.items():
        if name == reference:
            continue
        diverge = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
        result[name] = {
            "identical": diverge is None and len(ref) == len(other),
            "first_divergence": diverge,
            "reference_token": None if diverge is None else ref[diverge],
            "their_token": None if diverge is None else other[diverge],
        }
    return result


def compare_logits(logits: dict) -> dict | None:
    if "published code" not in logits:
        return None
    a, b = logits["ours"], logits["published code"]
    diff = (a - b).abs()
    return {
        "positions": a.shape[0],
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "prefill_position_max_abs_diff": diff[0].max().item(),
        "max_abs_logit": a.abs().max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


def bench_depth(args, llm_layers, vit_layers, release, device, dtype, clock, report, log) -> dict:
    model = build_model(args.preset, llm_layers, vit_layers, device, dtype, args.seed)
    theirs = build_release_model(release, model) if release is not None else None
    inputs = make_inputs(model, args.tokenizer, device)
    result = {
        "model": describe(model, inputs),
        "counts": counts(model, inputs, args.new_tokens, report["floor"]),
    }
    described = result["model"]
    log(
        f"{llm_layers}+{vit_layers} layers: {described['parameters'] / 1e9:.3g} B parameters; "
        f"prompt {described['prompt_tokens']} tokens"
    )
    paths = generation_paths(model, theirs, args)
    result["paths"], tokens = {}, {}
    for name, generate in paths.items():
        try:
            timed = time_generation(generate, inputs, args, clock)
        except Exception as error:  # one path failing must not cost the others' results
            result["paths"][name] = {"error": f"{type(error).__name__}: {error}"}
            log(f"  {name}: failed: {type(error).__name__}: {error}")
            continue
        tokens[name] = timed.pop("tokens")
        if name == "ours":
            timed["decode_path"] = decode_path(model)
        counted = result["counts"]
        timed["prefill_x_floor"] = timed["prefill_s"] / counted["prefill_floor_s"]
        timed["decode_x_floor"] = timed["decode_s_per_token"] / counted["decode_floor_s_per_token"]
        result["paths"][name] = timed
        log(
            f"  {name}: prefill {timed['prefill_s'] * 1e3:.2f} ms, decode "
            f"{timed['decode_s_per_token'] * 1e3:.3f} ms/token (warm-up {timed['warmup_s']:.1f} s)"
        )
    result["stages"] = prefill_stages(model, theirs, inputs, clock, args.repeats)
    reference = "ours" if "ours" in tokens else next(iter(tokens))
    result["greedy_vs_ours"] = compare_tokens(tokens, reference)
    logits = teacher_forced_logits(model, theirs, inputs, tokens[reference])
    result["logits_vs_published"] = compare_logits(logits)
    if args.profile:
        with args.profile.open("a") as out:
            out.write(profile_paths(paths, inputs, args.new_tokens, device, f"{llm_layers}+{vit_layers}"))
        log(f"  profiles appended to {args.profile}")
    del model, theirs, paths, logits
    free_memory(device)
    return result


def decode_path(model: NVLM_D_Model) -> str:
    """Which decode loop ran: GreedyDecoder with a CUDA graph, GreedyDecoder eagerly, or transformers'."""
    decoder = model._decoder
    if decoder is None:
        return "transformers' loop"
    if decoder.graph is not None:
        return "static cache + CUDA graph"
    return f"static cache, eager steps ({decoder.capture_error or 'no graph off CUDA'})"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fp32_check(args, release, device, log) -> dict:
    """Greedy tokens of every path in fp32 on a one-tile prompt, against ours through transformers'
    loop (the reference), at the first depth."""
    llm_layers, vit_layers = args.depths[0]
    model = build_model(args.preset, llm_layers, vit_layers, device, torch.float32, args.seed + 1)
    theirs = build_release_model(release, model) if release is not None else None
    inputs = make_inputs(model, args.tokenizer, device, grid=(1, 1))
    new_tokens = min(args.new_tokens, 16)
    tokens = {}
    for name, generate in generation_paths(model, theirs, args).items():
        try:
            tokens[name] = generate(inputs, new_tokens)[0].tolist()
        except Exception as error:
            tokens[name] = f"{type(error).__name__}: {error}"
    usable = {k: v for k, v in tokens.items() if isinstance(v, list)}
    result = {
        "depth": f"{llm_layers}+{vit_layers}",
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "tokens": tokens,
        "vs_reference": compare_tokens(usable, "ours, transformers loop"),
    }
    same = all(c["identical"] for c in result["vs_reference"].values())
    log(
        f"fp32 check ({result['depth']}, {result['prompt_tokens']}-token prompt): all paths identical: {same}"
    )
    del model, theirs
    free_memory(device)
    return result


def profile_paths(paths: dict, inputs: dict, new_tokens: int, device, label: str) -> str:
    """torch.profiler tables (busiest kernels first) of one whole generation of ours and of the
    published code."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    sections = []
    for name in ("ours", "published code"):
        if name not in paths:
            continue
        for n in (1, new_tokens):
            with profile(activities=activities) as prof:
                paths[name](inputs, n)
                if cuda:
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
            sections.append(f"== {label} layers, {name}, {n} new token(s)\n{table}")
    return "\n\n".join(sections) + "\n\n"


# -- output ------------------------------------------------------------------------------------------


def write_json(path: Path | None, report: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def print_table(report: dict) -> None:
    floor = report["floor"]
    mm = floor["matmul"]
    print(f"\n{report['args']['preset']} slices, {report['card']}")
    print(f"torch {report['torch']}, transformers {report['transformers']}, {report['date']}")
    print(
        f"floor: matmul {mm['m=n=k']}^3 {mm['dtype']} {floor['matmul_tflops']:.1f} TFLOP/s (best batch; "
        f"median {floor['matmul_tflops_median']:.1f}), device copy {floor['copy']['bytes'] / 2**30:.2f} GiB "
        f"{floor['bandwidth_tbs']:.3f} TB/s read+written (median {floor['bandwidth_tbs_median']:.3f})"
    )
    for depth in report["depths"]:
        model, counted = depth["model"], depth["counts"]
        dims = model["preset_dims"]
        print(
            f"\n{dims['llm_layers']} LLM + {dims['vit_layers']} ViT layers, "
            f"{model['parameters'] / 1e9:.3g} B parameters, {model['dtype']}; prompt {model['tiles']} tiles, "
            f"{model['image_tokens']} image + "
            f"{model['text_tokens']} text = {model['prompt_tokens']} tokens; "
            f"{report['args']['new_tokens']} new tokens, greedy"
        )
        print(
            f"floors: prefill {sum(counted['prefill_flops'].values()) / 1e12:.3f} TFLOP -> "
            f"{counted['prefill_floor_s'] * 1e3:.2f} ms; decode "
            f"{sum(counted['decode_weight_bytes'].values()) / 1e9:.2f} GB -> "
            f"{counted['decode_floor_s_per_token'] * 1e3:.3f} ms/token"
        )
        head = (
            f"{'path':<34} {'prefill ms':>10} {'x floor':>8} | {'decode ms/tok':>13} {'tok/s':>8} "
            f"{'x floor':>8} | {'peak GiB':>8}"
        )
        print(head)
        print("-" * len(head))
        for name, r in depth["paths"].items():
            if "error" in r:
                print(f"{name:<34} failed: {r['error'][:200]}")
                continue
            peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
            print(
                f"{name:<34} {r['prefill_s'] * 1e3:>10.2f} {r['prefill_x_floor']:>8.2f} | "
                f"{r['decode_s_per_token'] * 1e3:>13.3f} {r['decode_tokens_per_s'] or math.nan:>8.1f} "
                f"{r['decode_x_floor']:>8.2f} | {peak:>8}"
            )
        ours, theirs = depth["paths"]["ours"], depth["paths"].get("published code", {})
        if "decode_path" in ours:
            print(f"ours decodes through: {ours['decode_path']}")
        if "prefill_s" in theirs and "prefill_s" in ours:
            print(
                f"ours vs the published code: prefill {theirs['prefill_s'] / ours['prefill_s']:.2f}x faster, "
                f"decode {theirs['decode_s_per_token'] / ours['decode_s_per_token']:.2f}x faster"
            )
        stages = depth["stages"]
        line = (
            f"prefill stages: ours ViT+projector {stages['ours_vit_and_projector_s'] * 1e3:.2f} ms (floor "
            f"{counted['vit_and_projector_floor_s'] * 1e3:.2f}), "
            f"LLM {stages['ours_llm_prefill_s'] * 1e3:.2f} ms "
            f"(floor {counted['llm_prefill_floor_s'] * 1e3:.2f})"
        )
        line += f" (on all 32 ViT heads: {stages['ours_vit_and_projector_all_heads_s'] * 1e3:.2f} ms)"
        if "published_vit_and_projector_s" in stages:
            line += f"; published ViT+projector {stages['published_vit_and_projector_s'] * 1e3:.2f} ms"
        print(line)
        for name, g in depth["greedy_vs_ours"].items():
            print(
                f"{model['dtype']} greedy tokens, {name} vs ours: "
                f"{token_verdict(g, report['args']['new_tokens'])}"
            )
        logits = depth["logits_vs_published"]
        if logits:
            print(
                f"{model['dtype']} logits, ours vs the published code, prompt's last position + "
                f"{logits['positions'] - 1} continuation tokens: max abs diff {logits['max_abs_diff']:.4g} "
                f"(prefill position "
                f"{logits['prefill_position_max_abs_diff']:.4g}; max |logit| {logits['max_abs_logit']:.3g}), "
                f"mean {logits['mean_abs_diff']:.3g}, top-1 agreement {100 * logits['top1_agreement']:.1f}%"
            )
    check = report.get("fp32_check")
    if check:
        print(
            f"\nfp32 check, {check['depth']} layers, {check['prompt_tokens']}-token prompt, "
            f"{check['new_tokens']} new tokens, against ours through transformers' loop:"
        )
        for name, g in check["vs_reference"].items():
            print(f"  {name}: {token_verdict(g, check['new_tokens'])}")
        for name, t in check["tokens"].items():
            if isinstance(t, str):
                print(f"  {name}: failed: {t[:200]}")


def token_verdict(g: dict, n: int) -> str:
    if g["identical"]:
        return f"identical ({n}/{n})"
    return (
        f"first divergence at token {g['first_divergence']} (reference {g['reference_token']}, "
        f"this path {g['their_token']})"
    )


if __name__ == "__main__":
    main()
