"""Prefill and decode speed of the NVLM_D class on one card, next to its floor and the release's eager path.

Issue 8 part 3. In one run on one device:
1. the floor: the card's measured bf16 matmul rate (8192^3, CUDA events) and memory bandwidth (a large
   device copy, bytes read + written over time); prefill FLOPs of the slice for the prompt (2 x the
   linear weights each token passes through, plus attention scores and context) over the rate, and
   decode bytes (LLM layers + final norm + lm_head + one embedding row) over the bandwidth;
2. a full-width slice of a preset (default `nvlm-d-72b` with 4 LLM + 4 ViT layers, real widths and
   vocab) with seeded random weights built directly on the device, and a 7-tile image prompt (a 3:2
   picture: 6 tiles + thumbnail) in the published chat format;
3. time to first token (`generate(max_new_tokens=1)`) and decode tokens/s (64 new tokens, KV cache,
   greedy: (t64 - t1) / 63) for our default path and for the release's formulation (see
   `release_formulation`), medians of several runs after warm-up, on the same weights;
4. the outputs of both: greedy tokens (first divergence), and the logits of both over the prompt plus
   our continuation (teacher forcing): max abs diff, top-1 agreement.

    PYTHONPATH=$PWD python3 scripts/bench_model.py --json bench_model.json         # one H100/H200
    PYTHONPATH=$PWD python3 scripts/bench_model.py --device cpu --preset tiny --dtype fp32  # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
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
from modeling.modeling_intern_vit import InternAttention, InternRMSNorm  # noqa: E402
from modeling.processing_nvlm_d import IMG_CONTEXT_TOKEN, image_to_pixel_values  # noqa: E402

TINY_TOKENIZER = REPO / "tests" / "fixtures" / "tiny-tokenizer"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUESTION = "Describe the image in detail."  # + the chat format and tile tags: 60 text tokens (Qwen2)
GRID = (3, 2)  # columns x rows of tiles: 6 tiles + the thumbnail = 7


def main(argv: list[str] | None = None) -> dict:
    log = Log()
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    transformers.logging.set_verbosity_error()
    clock = Clock(device)
    report = header(args, device, sys.argv[1:] if argv is None else argv)
    log(f"{report['card']}, torch {report['torch']}, transformers {report['transformers']}")

    report["floor"] = measure_floor(device, dtype, clock, quick=args.quick_floor)
    log(f"floor: {report['floor']['matmul_tflops']:.1f} TFLOP/s, {report['floor']['bandwidth_tbs']:.3f} TB/s")
    model = build_model(args.preset, args.llm_layers, args.vit_layers, device, dtype, args.seed)
    inputs = make_inputs(model, args.tokenizer, device)
    report["model"] = describe(model, inputs)
    report["counts"] = counts(model, inputs, args.new_tokens)
    write_json(args.json, report)
    described = report["model"]
    log(
        f"model: {described['parameters'] / 1e9:.3g} B parameters; prompt {described['prompt_tokens']} tokens"
    )

    paths = {"ours": default_path, "eager": release_formulation}
    if args.static_cache:
        paths["ours+static"] = static_cache
    report["paths"], tokens = {}, {}
    for name, formulation in paths.items():
        try:
            with formulation(model) as gen_kwargs:
                result = time_generation(model, inputs, gen_kwargs, args, clock)
        except Exception as error:  # an optional variant must not cost the other results
            if name in ("ours", "eager"):
                raise
            report["paths"][name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        tokens[name] = result.pop("tokens")
        report["paths"][name] = add_floor_ratios(result, report, name)
        write_json(args.json, report)
        log(
            f"{name}: prefill {result['prefill_s'] * 1e3:.2f} ms, decode "
            f"{result['decode_s_per_token'] * 1e3:.3f} ms/token (warm-up {result['warmup_s']:.1f} s)"
        )

    report["outputs"] = compare_outputs(model, inputs, tokens, args.new_tokens)
    if args.profile:
        args.profile.write_text(profile_paths(model, inputs, paths, args.new_tokens, device))
        log(f"profiles written to {args.profile}")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nvlm-d-72b", help="modeling.presets name (default nvlm-d-72b)")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--vit-layers", type=int, default=4)
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
        help="also time ours with cache_implementation='static' (transformers then compiles the decode "
        "step with torch.compile on CUDA; minutes of compilation, off by default)",
    )
    parser.add_argument("--quick-floor", action="store_true", help="small floor measurements (smoke runs)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="after the timings, profile one prefill and one generation of each path and write the "
        "busiest kernels here (text)",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here (rewritten after each stage)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is (t(n) - t(1)) / (n - 1))")
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


def make_inputs(model: NVLM_D_Model, tokenizer_dir: Path | None, device: torch.device) -> dict:
    """pixel_values of a 3:2 picture (6 tiles + thumbnail) and the chat prompt's ids, on the device."""
    config = model.config
    size = config.image_size
    pixel_values = image_to_pixel_values(
        synthetic_image(GRID[0] * size, GRID[1] * size),
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
    return {
        "pixel_values": pixel_values.to(device),
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


def prefill_flops(model: NVLM_D_Model, tiles: int, seq_len: int, logit_positions: int) -> dict[str, int]:
    """Matmul FLOPs of one prefill: 2 per weight per token through every linear layer (the ViT's dummy
    heads included: they are computed), plus attention scores and context (causal in the LLM)."""
    vit, llm = model.config.vision_config, model.config.llm_config
    patches = (vit.image_size // vit.patch_size) ** 2
    vit_tokens = patches + 1  # class token
    padded_width = vit.num_padded_heads * vit.head_dim
    image_tokens = tiles * model.num_image_token
    attn_width = llm.num_attention_heads * llm_head_dim(llm)
    patch_weights = model.vision_model.embeddings.patch_embedding.weight.numel()
    return {
        "vit_patch_embedding": 2 * tiles * patches * patch_weights,
        "vit_linear": 2 * tiles * vit_tokens * linear_weights(model.vision_model.encoder),
        "vit_attention": 4 * tiles * vit_tokens**2 * padded_width * vit.num_hidden_layers,
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


def counts(model: NVLM_D_Model, inputs: dict, new_tokens: int) -> dict:
    tiles, seq_len = int(inputs["pixel_values"].shape[0]), int(inputs["input_ids"].shape[1])
    weights = decode_bytes(model)
    return {
        "prefill_flops": {
            "ours": prefill_flops(model, tiles, seq_len, logit_positions=1),
            "eager": prefill_flops(model, tiles, seq_len, logit_positions=seq_len),
        },
        "decode_weight_bytes": weights,
        "decode_kv_bytes_mid": kv_cache_bytes(model, seq_len + new_tokens // 2),  # not in the floor
    }


def add_floor_ratios(result: dict, report: dict, path: str) -> dict:
    floor = report["floor"]
    flops = sum(report["counts"]["prefill_flops"]["eager" if path == "eager" else "ours"].values())
    weight_bytes = sum(report["counts"]["decode_weight_bytes"].values())
    result["prefill_flops"] = flops
    result["prefill_floor_s"] = flops / (floor["matmul_tflops"] * 1e12)
    result["prefill_x_floor"] = result["prefill_s"] / result["prefill_floor_s"]
    result["decode_floor_s_per_token"] = weight_bytes / (floor["bandwidth_tbs"] * 1e12)
    result["decode_x_floor"] = result["decode_s_per_token"] / result["decode_floor_s_per_token"]
    return result


# -- the two formulations ----------------------------------------------------------------------------------


def plain_rms_norm(self: InternRMSNorm, hidden_states: torch.Tensor, variance=None) -> torch.Tensor:
    """The release's InternRMSNorm: an explicit float32 chain."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    if variance is None:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return hidden_states.to(input_dtype) * self.weight


def naive_vit_attention(self: InternAttention, hidden_states: torch.Tensor) -> torch.Tensor:
    """The release's naive attention: explicit softmax(q k^T) v over all 32 heads, plain QK-norm chain."""
    B, N, _ = hidden_states.shape
    q, k, v = self.qkv(hidden_states).split(self.padded_dim, dim=-1)
    if self.qk_normalization:
        real = self.embed_dim
        q = self.q_norm(q, variance=q[..., :real].float().pow(2).sum(-1, keepdim=True) / real)
        k = self.k_norm(k, variance=k[..., :real].float().pow(2).sum(-1, keepdim=True) / real)
    q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
    weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    context = (weights @ v).transpose(1, 2).reshape(B, N, self.padded_dim)
    return self.proj(context)


@contextlib.contextmanager
def release_formulation(model: NVLM_D_Model):
    """What the published remote code computes, on our weights: the plain float32 RMSNorm chain and
    naive attention in the ViT, eager attention in Qwen2, and logits at every prompt position upcast
    to float32 (as transformers 4.x's Qwen2 did). Yields the generate() kwargs of that path."""
    patched = [m for m in model.vision_model.modules() if isinstance(m, (InternRMSNorm, InternAttention))]
    for module in patched:
        forward = plain_rms_norm if isinstance(module, InternRMSNorm) else naive_vit_attention
        module.forward = types.MethodType(forward, module)
    previous = model.language_model.config._attn_implementation
    model.language_model.set_attn_implementation("eager")
    upcast = model.language_model.lm_head.register_forward_hook(lambda module, args, out: out.float())
    try:
        yield {"logits_to_keep": 0}
    finally:
        upcast.remove()
        model.language_model.set_attn_implementation(previous)
        for module in patched:
            del module.forward


@contextlib.contextmanager
def default_path(model: NVLM_D_Model):
    """The model class as it is (SDPA in both towers, last-position logits in generate)."""
    yield {}


@contextlib.contextmanager
def static_cache(model: NVLM_D_Model):
    """Ours with transformers' static KV cache (on CUDA transformers compiles the decode step)."""
    yield {"cache_implementation": "static"}


# -- measuring -------------------------------------------------------------------------------------------


def greedy(model: NVLM_D_Model, inputs: dict, new_tokens: int, gen_kwargs: dict) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens: EOS off, random weights must not stop a run early."""
    pad = model.config.llm_config.bos_token_id  # <|endoftext|>, the release's pad token
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad,
        **gen_kwargs,
    )


def time_generation(model: NVLM_D_Model, inputs: dict, gen_kwargs: dict, args, clock: Clock) -> dict:
    """Median time to first token and median time of `new_tokens` tokens; decode = the difference."""

    def generate(n: int) -> torch.Tensor:
        return greedy(model, inputs, n, gen_kwargs)

    start = time.perf_counter()
    for _ in range(args.warmup):
        generate(1)
    generate(args.new_tokens)
    warmup_s = time.perf_counter() - start

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first = [clock(lambda: generate(1))[0] for _ in range(args.repeats)]
    full, tokens = [], None
    for _ in range(args.repeats):
        seconds, tokens = clock(lambda: generate(args.new_tokens))
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
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
        "tokens": tokens[0].tolist(),
    }


@torch.no_grad()
def compare_outputs(model: NVLM_D_Model, inputs: dict, tokens: dict[str, list[int]], new_tokens: int) -> dict:
    """Greedy tokens of every path against ours, and the logits of ours and the release's formulation
    over the prompt's last position plus our continuation (teacher forcing, so one early flip of a
    near tie does not hide how close the rest is)."""
    ours = tokens["ours"]
    greedy = {}
    for name, other in tokens.items():
        if name == "ours":
            continue
        diverge = next((i for i, (a, b) in enumerate(zip(ours, other)) if a != b), None)
        greedy[name] = {
            "identical": diverge is None,
            "first_divergence": diverge,
            "ours_token": None if diverge is None else ours[diverge],
            "their_token": None if diverge is None else other[diverge],
        }

    device = inputs["input_ids"].device
    ids = torch.cat([inputs["input_ids"], torch.tensor([ours[:-1]], device=device)], dim=1)
    forward = dict(pixel_values=inputs["pixel_values"], input_ids=ids, logits_to_keep=new_tokens)
    logits = {}
    for name, formulation in (("ours", default_path), ("eager", release_formulation)):
        with formulation(model):
            logits[name] = model(**forward).logits[0].float()
    a, b = logits["ours"], logits["eager"]
    diff = (a - b).abs()
    return {
        "greedy_vs_ours": greedy,
        "teacher_forced_positions": new_tokens,
        "logits_max_abs_diff": diff.max().item(),
        "logits_mean_abs_diff": diff.mean().item(),
        "prefill_logits_max_abs_diff": diff[0].max().item(),
        "logits_max_abs": a.abs().max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "ours_greedy_is_own_argmax": a.argmax(-1).tolist() == ours,
    }


def profile_paths(model: NVLM_D_Model, inputs: dict, paths: dict, new_tokens: int, device) -> str:
    """torch.profiler tables (busiest kernels first) of one prefill and one whole generation per path."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    sections = []
    for name, formulation in paths.items():
        for n in (1, new_tokens):
            try:
                with formulation(model) as gen_kwargs, profile(activities=activities) as prof:
                    greedy(model, inputs, n, gen_kwargs)
                    if cuda:
                        torch.cuda.synchronize()
            except Exception as error:
                sections.append(f"== {name}, {n} new token(s): failed: {type(error).__name__}: {error}")
                continue
            table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
            sections.append(f"== {name}, {n} new token(s)\n{table}")
    return "\n\n".join(sections) + "\n"


# -- output ------------------------------------------------------------------------------------------


def write_json(path: Path | None, report: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def print_table(report: dict) -> None:
    model, floor, out = report["model"], report["floor"], report["outputs"]
    dims = model["preset_dims"]
    print(
        f"\n{report['args']['preset']} slice: {dims['llm_layers']} LLM + {dims['vit_layers']} ViT layers, "
        f"{model['parameters'] / 1e9:.3g} B parameters, {model['dtype']}, on {report['card']}"
    )
    print(f"torch {report['torch']}, transformers {report['transformers']}, {report['date']}")
    print(
        f"prompt: {model['tiles']} tiles, {model['image_tokens']} image + {model['text_tokens']} text = "
        f"{model['prompt_tokens']} tokens; {report['args']['new_tokens']} new tokens, greedy"
    )
    mm = floor["matmul"]
    print(
        f"floor: matmul {mm['m=n=k']}^3 {mm['dtype']} {floor['matmul_tflops']:.1f} TFLOP/s (best batch; "
        f"median {floor['matmul_tflops_median']:.1f}), device copy {floor['copy']['bytes'] / 2**30:.2f} GiB "
        f"{floor['bandwidth_tbs']:.3f} TB/s read+written (median {floor['bandwidth_tbs_median']:.3f})\n"
    )
    head = (
        f"{'path':<12} {'prefill ms':>10} {'TFLOP':>7} {'floor ms':>9} {'x floor':>8} | "
        f"{'decode ms/tok':>13} {'tok/s':>8} {'floor ms':>9} {'x floor':>8} | {'peak GiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, r in report["paths"].items():
        if "error" in r:
            print(f"{name:<12} failed: {r['error']}")
            continue
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        print(
            f"{name:<12} {r['prefill_s'] * 1e3:>10.2f} {r['prefill_flops'] / 1e12:>7.3f} "
            f"{r['prefill_floor_s'] * 1e3:>9.2f} {r['prefill_x_floor']:>8.2f} | "
            f"{r['decode_s_per_token'] * 1e3:>13.3f} {r['decode_tokens_per_s'] or math.nan:>8.1f} "
            f"{r['decode_floor_s_per_token'] * 1e3:>9.3f} {r['decode_x_floor']:>8.2f} | {peak:>8}"
        )
    ours, eager = report["paths"]["ours"], report["paths"]["eager"]
    print(
        f"\nours vs eager: prefill {eager['prefill_s'] / ours['prefill_s']:.2f}x faster, "
        f"decode {eager['decode_s_per_token'] / ours['decode_s_per_token']:.2f}x faster"
    )
    for name, g in out["greedy_vs_ours"].items():
        verdict = (
            f"identical ({report['args']['new_tokens']}/{report['args']['new_tokens']})"
            if g["identical"]
            else f"first divergence at token {g['first_divergence']} (ours {g['ours_token']}, "
            f"{name} {g['their_token']})"
        )
        print(f"greedy tokens, {name} vs ours: {verdict}")
    print(
        f"logits over the prompt's last position + {out['teacher_forced_positions'] - 1} continuation "
        f"tokens, ours vs eager: max abs diff {out['logits_max_abs_diff']:.4g} (prefill position "
        f"{out['prefill_logits_max_abs_diff']:.4g}; max |logit| {out['logits_max_abs']:.3g}), mean abs diff "
        f"{out['logits_mean_abs_diff']:.3g}, top-1 agreement {100 * out['top1_agreement']:.1f}%"
    )
    same = "yes" if out["ours_greedy_is_own_argmax"] else "no (bf16: cached and uncached kernels round apart)"
    print(f"our greedy tokens = the argmax of our own uncached forward at every step: {same}")


if __name__ == "__main__":
    main()
