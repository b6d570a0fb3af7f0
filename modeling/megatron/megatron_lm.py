"""NVIDIA's own NVLM model, built and loaded by the code of a Megatron-LM checkout, on its own ranks.

`run(job)` starts one fresh interpreter per rank (TP x PP of the checkpoint; gloo on the CPU, NCCL
on GPUs), each of which runs, from the checkout the user named (never from a copy in this project):

1. the checkout first on sys.path (`DIR/examples/multimodal`, `DIR`): its `megatron.training`,
   and its own `megatron/core` where it has one (NVLM-1.0: 0.10; core_r0.19.0: 0.19), else the
   installed megatron-core (a trimmed checkout without `megatron/core`);
2. the compatibility steps below, then Megatron-LM's `initialize_megatron` on a command line made
   from the checkpoint's own args (`checkpoint_command_line`): the model-defining flags NVIDIA's
   NVLM inference script passes (`examples/multimodal/nvlm/run_text_generation_qwen20_72b_
   internvit_6b.sh`), spelled with the checkout's own argument parser, plus `--use-checkpoint-args`
   (NVIDIA's `load_args_from_checkpoint` fills the rest) and the run's own flags (layout, dtype,
   tokenizer folder, no optimizer / RNG state, fusions off);
3. `get_model(examples/multimodal/model.py:model_provider, parallel_output=False)` and
   Megatron-LM's `load_checkpoint(model, None, None)`;
4. per case: the prompt through NVIDIA's MultimodalTokenizer (`tokenize_conversation`, the
   checkpoint's `--tokenizer-prompt-format`, e.g. qwen2p0), one `LLaVAModel.forward` (tile tags
   and image embeddings inserted inside the model), every ViT layer / projector / LLM layer output
   recorded by forward hooks, and greedy tokens by repeated full forwards.

Rank 0 returns, per case, NVIDIA's prompt ids, the sequence the LLM saw in token space (each
image token -> per tile its tag ids + one placeholder per image embedding, as
`LLaVAModel._apply_tile_tagging` orders them), the logits, the layer outputs and the tokens.

Compatibility steps (each documented where it lives):
- Transformer Engine absent: `te_emulation.install()`, and `te_emulation.bind(layer_specs)` (the
  report says "TE emulated");
- CPU only: `cpu_shim.install_for_megatron_lm(one_device_per_rank=True)`, `cpu_shim.megatron_rng()`;
- every `torch.load` NVIDIA's code makes in these ranks goes through the converter's safe loader
  (converter/formats/safe_pickle.py, `--trust-pickle` to opt out); the inert stand-ins it returns for
  megatron enums become the running checkout's enums where a member of that value exists, a
  pickled BytesIO a BytesIO again;
- no build step: `megatron.core.datasets.utils.compile_helpers` (runs `make` inside the checkout)
  and NVLM-1.0's `megatron.legacy.fused_kernels.load` (nvcc) are skipped: no dataset is read and
  the fused softmax is off;
- transformers 5: `apply_chat_template` defaults to return_dict=False again (transformers 4's
  default, which NVIDIA's `tokenize_conversation(...)[0]` indexes);
- Python 3.11: Megatron-LM 0.19 imports `typing.override` (3.12); typing_extensions' identical
  no-op decorator is supplied;
- faults of Megatron-LM core_r0.19.0 on the NVLM path (each stops NVIDIA's own NVLM scripts; the
  same ones scripts/fixtures/megatron_lm_nvlm_wrapper.py found on the GPU): `build_tokenizer`
  gives a MultimodalTokenizer no path ("Tokenizer path must be specified": `--tokenizer-model` is
  passed on, as its other tokenizer types do); `layer_specs.get_norm_mlp_module_spec_te` /
  `get_mlp_module_spec` now return a functools.partial, whose `.submodules` model.py reads (the
  partial's own `submodules` are handed over as the ModuleSpec of MLP that 0.10 returned);
  `_get_tile_tags` reads `tokenizer._prompt_config`, which 0.19's tokenizer wrapper does not
  forward (the inner tokenizer's is set on it); config.py's internvit block never sets
  `qk_layernorm` while nvlm/internvit.py's spec has q/k norms, which 0.19's SelfAttention refuses
  (set True for the vision config where megatron-core is 0.19+);
- sizes: `examples/multimodal/config.py` hard-codes InternViT-6B / Qwen2-72B / projector sizes per
  `--vision-model-type` / `--language-model-type` (the args store none of them); where the
  checkpoint's tensors say otherwise (a smaller model), its three functions are wrapped to call
  NVIDIA's and then set the checkpoint's sizes; every change is listed in the result
  (`size_overrides`; empty for NVLM-D-72B).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import cpu_shim, te_emulation

# The model-defining flags of NVIDIA's NVLM inference script, by the args field they set (what
# --use-checkpoint-args leaves to the command line, and the rest for clarity). A field a
# generation's parser lacks is skipped; `layernorm_epsilon` is 0.19's name of `norm_epsilon`.
CHECKPOINT_FLAGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "kv_channels",
    "normalization",
    "norm_epsilon",
    "layernorm_epsilon",
    "swiglu",
    "add_bias_linear",
    "add_qkv_bias",
    "untie_embeddings_and_output_weights",
    "position_embedding_type",
    "rotary_percent",
    "rotary_base",
    "rotary_interleaved",
    "use_rope_scaling",
    "max_position_embeddings",
    "seq_length",
    "decoder_seq_length",
    "make_vocab_size_divisible_by",
    "attention_softmax_in_fp32",
    "apply_query_key_layer_scaling",
    "tokenizer_type",
    "tokenizer_prompt_format",
    "special_tokens",
    "image_tag_type",
    "language_model_type",
    "vision_model_type",
    "disable_vision_class_token",
    "img_h",
    "img_w",
    "patch_dim",
    "pixel_shuffle",
    "use_tiling",
    "max_num_tiles",
    "use_thumbnail",
    "use_tile_tags",
    "use_te",
    "transformer_impl",
    "ckpt_format",
    "seed",
)
_ALIASES = {"norm_epsilon": "layernorm_epsilon", "layernorm_epsilon": "norm_epsilon"}
# Fusions a host without TE / apex / CUDA kernels cannot run (the unfused paths compute the same).
_NO_FUSIONS = (
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-dropout-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-swiglu-fusion",
    "--no-persist-layer-norm",
    "--no-rope-fusion",
)
SYSTEM = "Answer the questions."


@dataclass
class MegatronLMJob:
    megatron_lm: str  # the checkout
    checkpoint: str
    tokenizer: str  # a folder with the HF tokenizer (NVIDIA's MultimodalTokenizer wraps it)
    tp: int
    pp: int = 1
    dtype: str = "float32"  # or "bfloat16" (--bf16)
    cases: list[dict] = field(default_factory=list)  # {"conversation", "pixel_values", "num_tiles"}
    sizes: dict = field(default_factory=dict)  # the checkpoint's sizes (checkpoint_sizes)
    collect_layers: bool = True
    logits: bool = True
    generate_tokens: int = 0
    eos_token_id: int | None = None
    true_vocab: int | None = None  # logits columns kept (None: all)
    trust_pickle: bool = False
    extra_flags: list[str] = field(default_factory=list)  # Megatron-LM flags the args lack (after theirs)


def conversation(question: str, history=(), system: str = SYSTEM) -> list[dict]:
    """NVIDIA's run_text_generation conversation: system message, earlier turns, the question
    (`<image>` where the image goes, as the caller put it)."""
    turns = [{"role": "system", "content": system}]
    for asked, answered in history:
        turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return turns + [{"role": "user", "content": question}]


def checkpoint_sizes(ckpt) -> dict:
    """The sizes examples/multimodal/config.py hard-codes, as the checkpoint's tensors give them."""
    from converter.families import CheckpointTensors
    from converter.families.nvlm_d import vision_structure
    from mappings.megatron_args import arg

    vit = vision_structure(ckpt.args, CheckpointTensors(ckpt))
    return {
        "vision": {
            "num_layers": vit["num_hidden_layers"],
            "hidden_size": vit["hidden_size"],
            "num_attention_heads": vit["megatron_heads"],
            "num_query_groups": vit["megatron_heads"],
            "kv_channels": vit["head_dim"],
            "ffn_hidden_size": vit["intermediate_size"],
        },
        "language": {"ffn_hidden_size": arg(ckpt.args, "ffn_hidden_size")},
        "projection": {"ffn_hidden_size": vit["projector_hidden"]},
    }


# -- the parent: start the ranks, collect rank 0's result ------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(job: MegatronLMJob, timeout: float | None = None) -> dict:
    """Run `job` on tp * pp fresh ranks; rank 0's result. A failing rank raises RuntimeError with the
    end of its log (each rank's output goes to its own log file: NVIDIA's code prints a lot)."""
    world = job.tp * job.pp
    with tempfile.TemporaryDirectory(prefix="nvlm-megatron-lm-") as work, contextlib.ExitStack() as logs:
        work = Path(work)
        torch.save(asdict(job), work / "job.pt")
        port = _free_port()
        threads = max(1, (os.cpu_count() or 1) // world)
        procs = []
        for rank in range(world):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS=str(threads),
                CUDA_DEVICE_MAX_CONNECTIONS="1",  # what NVIDIA's scripts export
                NVTE_APPLY_QK_LAYER_SCALING="0",
                TOKENIZERS_PARALLELISM="false",
            )
            log = logs.enter_context((work / f"rank{rank}.log").open("w"))
            command = [sys.executable, "-m", "modeling.megatron.megatron_lm", str(work)]
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work))
        failed, deadline = None, None if timeout is None else time.monotonic() + timeout
        while failed is None and any(proc.poll() is None for proc in procs):
            failed = next(
                ((r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)), None
            )
            if deadline is not None and time.monotonic() > deadline:
                failed = (0, "timeout")
            time.sleep(0.2)
        failed = failed or next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0), None)
        for proc in procs:  # one rank failed: the others wait in a collective for ever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if failed is not None:
            rank, code = failed
            tail = (work / f"rank{rank}.log").read_text()[-6000:]
            raise RuntimeError(f"Megatron-LM rank {rank} failed (exit {code}):\n{tail}")
        return torch.load(work / "result.pt", weights_only=True)


def prompt_ids(
    megatron_lm: str | Path,
    tokenizer: str | Path,
    conversations: list[list[dict]],
    *,
    prompt_format: str = "qwen2p0",
    image_tag_type: str = "nvlm",
    max_num_tiles: int = 6,
    language_model_type: str = "qwen2.0_72B",
) -> dict:
    """Megatron-LM's own NVLM prompt path without a model, in one fresh interpreter: the checkout's
    `build_tokenizer` (MultimodalTokenizer over the tokenizer folder), `tokenize_conversation` of
    each conversation, and model.py's `_get_tile_tags`. {"native": [[ids]], "tile_tags": [[ids]],
    "image_token_id": id}."""
    request = dict(
        megatron_lm=str(Path(megatron_lm).resolve()),
        tokenizer=str(Path(tokenizer).resolve()),
        conversations=conversations,
        flags=[
            "--tokenizer-type",
            "MultimodalTokenizer",
            "--tokenizer-model",
            str(Path(tokenizer).resolve()),
            "--tokenizer-prompt-format",
            prompt_format,
            "--image-tag-type",
            image_tag_type,
            "--language-model-type",
            language_model_type,
            "--max-num-tiles",
            str(max_num_tiles),
            "--use-tile-tags",
            "--micro-batch-size",
            "1",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="nvlm-megatron-lm-prompts-") as work:
        work = Path(work)
        torch.save(request, work / "prompts.pt")
        done = subprocess.run(
            [sys.executable, "-m", "modeling.megatron.megatron_lm", str(work), "--prompts"],
            capture_output=True,
            text=True,
            cwd=work,
        )
        if done.returncode != 0:
            raise RuntimeError(f"Megatron-LM's prompt path failed:\n{(done.stdout + done.stderr)[-6000:]}")
        return torch.load(work / "result.pt", weights_only=True)


# -- inside a rank ---------------------------------------------------------------------------------


def _python_compat() -> None:
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def _resolve(value):
    """The safe loader's stand-ins -> what NVIDIA's code expects, where that runs nothing: a pickled
    BytesIO -> BytesIO; a megatron enum member -> the running checkout's member of that value (kept
    as a stand-in where there is none, e.g. NVLM-1.0's ModelType(2) under 0.19)."""
    from converter.formats import safe_pickle

    if isinstance(value, dict):
        return type(value)((k, _resolve(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v) for v in value)
    if isinstance(value, argparse.Namespace):
        for key, item in vars(value).items():
            setattr(value, key, _resolve(item))
        return value
    if isinstance(value, safe_pickle.StandIn):
        if value.global_name == "_io.BytesIO":
            data = safe_pickle.bytes_of(value)
            return io.BytesIO(data) if data is not None else value
        module, _, name = value.global_name.rpartition(".")
        if module.startswith("megatron.") and value.value is not None:
            try:
                cls = getattr(__import__(module, fromlist=[name]), name)
                if isinstance(cls, type) and issubclass(cls, enum.Enum):
                    return cls(value.value)
            except (ImportError, AttributeError, ValueError):
                pass
    return value


def _safe_torch_load(trust_pickle: bool) -> None:
    from converter.formats import safe_pickle

    original = torch.load

    def load(f, map_location=None, *args, **kwargs):
        source = Path(f) if isinstance(f, (str, os.PathLike)) else f.read()
        torch.load = original  # the safe loader's own torch.load (weights_only)
        try:
            return _resolve(safe_pickle.load(source, trust_pickle=trust_pickle, mmap=False))
        finally:
            torch.load = load

    torch.load = load


def no_build_steps() -> None:
    from megatron.core.datasets import utils as dataset_utils

    dataset_utils.compile_helpers = lambda *args, **kwargs: None
    try:
        from megatron.legacy import fused_kernels
    except ImportError:
        return
    fused_kernels.load = lambda *args, **kwargs: None


def chat_template_return_dict() -> None:
    from transformers import PreTrainedTokenizerBase

    original = PreTrainedTokenizerBase.apply_chat_template
    if getattr(original, "_nvlm_port_return_dict", False):
        return

    @functools.wraps(original)
    def apply_chat_template(self, *args, **kwargs):
        kwargs.setdefault("return_dict", False)
        return original(self, *args, **kwargs)

    apply_chat_template._nvlm_port_return_dict = True
    PreTrainedTokenizerBase.apply_chat_template = apply_chat_template


def _multimodal_tokenizer_path(folder: str) -> None:
    try:
        from megatron.core.tokenizers.utils import build_tokenizer as module
    except ImportError:  # NVLM-1.0: megatron/training/tokenizer builds it with the path
        return
    megatron_tokenizer = module.MegatronTokenizer

    class MegatronTokenizer:
        @staticmethod
        def from_pretrained(tokenizer_path=None, metadata_path=None, **kwargs):
            multimodal = isinstance(metadata_path, dict) and metadata_path.get("library") == "multimodal"
            if tokenizer_path is None and multimodal:
                tokenizer_path = folder
            return megatron_tokenizer.from_pretrained(tokenizer_path, metadata_path, **kwargs)

    module.MegatronTokenizer = MegatronTokenizer


def _spec_with_submodules(model_module) -> None:
    """0.19's layer_specs returns partial(MLP.as_mlp_submodule, submodules=...) where model.py wants
    an object with `.submodules` (the ModuleSpec of 0.10)."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    for name in ("get_norm_mlp_module_spec_te", "get_mlp_module_spec"):
        original = getattr(model_module, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def as_module_spec(*args, _original=original, **kwargs):
            spec = _original(*args, **kwargs)
            if isinstance(spec, functools.partial) and "submodules" in spec.keywords:
                return ModuleSpec(module=MLP, submodules=spec.keywords["submodules"])
            return spec

        setattr(model_module, name, as_module_spec)


def _tokenizer_prompt_config() -> None:
    from megatron.training import get_tokenizer

    tokenizer = get_tokenizer()
    inner = getattr(tokenizer, "_tokenizer", None)
    if not hasattr(tokenizer, "_prompt_config") and hasattr(inner, "_prompt_config"):
        tokenizer._prompt_config = inner._prompt_config


def _core_at_least(major: int, minor: int) -> bool:
    try:
        version = _core_version().split(".")
        return (int(version[0]), int(version[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def _checkpoint_sizes_in_config(sizes: dict) -> list[str]:
    """Wrap examples/multimodal/config.py: NVIDIA's function, then the checkpoint's sizes where they
    differ. Returns the list of changes (filled as the model is built)."""
    import config as nvidia_config

    changes: list[str] = []

    def wrap(name, part):
        original = getattr(nvidia_config, name)

        @functools.wraps(original)
        def wrapped(config, *args, **kwargs):
            config = original(config, *args, **kwargs)
            wanted = dict(sizes.get(part, {}))
            if part == "vision" and config.vision_model_type == "internvit" and _core_at_least(0, 19):
                wanted["qk_layernorm"] = True  # nvlm/internvit.py's q/k norms (see module docstring)
            for key, value in wanted.items():
                if getattr(config, key, None) != value:
                    changes.append(f"{part}.{key}: {getattr(config, key, None)} -> {value}")
                    setattr(config, key, value)
            return config

        setattr(nvidia_config, name, wrapped)

    wrap("get_language_model_config", "language")
    wrap("get_vision_model_config", "vision")
    wrap("get_vision_projection_config", "projection")
    return changes


def _megatron_parser(parse_args, extra_args_provider) -> argparse.ArgumentParser:
    """The checkout's own argument parser, captured as its parse_args is about to parse."""

    class _Captured(Exception):
        pass

    captured = {}

    def grab(self, *args, **kwargs):
        captured["parser"] = self
        raise _Captured

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = grab
    try:
        parse_args(extra_args_provider)
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    return captured["parser"]


def checkpoint_command_line(checkpoint_args, parser: argparse.ArgumentParser) -> list[str]:
    """The CHECKPOINT_FLAGS the checkpoint's args hold, spelled with `parser` (NVIDIA's): a flag
    only where the value differs from the parser's default."""
    by_dest: dict[str, list] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    argv: list[str] = []
    for dest in CHECKPOINT_FLAGS:
        if dest not in by_dest:
            continue
        value = getattr(checkpoint_args, dest, None)
        if value is None and dest in _ALIASES:
            value = getattr(checkpoint_args, _ALIASES[dest], None)
        if value is None:
            continue
        for action in by_dest[dest]:
            if not action.option_strings:
                continue
            option = action.option_strings[0]
            if isinstance(action, argparse._StoreTrueAction):
                if value is True and action.default is not True:
                    argv.append(option)
                    break
            elif isinstance(action, argparse._StoreFalseAction):
                if value is False and action.default is not False:
                    argv.append(option)
                    break
            elif isinstance(action, argparse._StoreAction):
                if value == action.default:
                    break
                if action.nargs in ("*", "+") or isinstance(value, (list, tuple)):
                    argv += [option, *map(str, value)]
                else:
                    argv += [option, str(value)]
                break
    return argv


def _run_flags(job: dict, parser: argparse.ArgumentParser, cpu: bool) -> list[str]:
    known = {option for action in parser._actions for option in action.option_strings}
    flags = [
        "--use-checkpoint-args",
        "--load",
        job["checkpoint"],
        "--no-load-optim",
        "--no-load-rng",
        "--exit-on-missing-checkpoint",
        "--micro-batch-size",
        "1",
        "--tensor-model-parallel-size",
        str(job["tp"]),
        "--pipeline-model-parallel-size",
        str(job["pp"]),
        "--tokenizer-model",
        job["tokenizer"],
    ]
    if "--no-use-tokenizer-model-from-checkpoint-args" in known:
        flags.append("--no-use-tokenizer-model-from-checkpoint-args")
    if job["dtype"] == "bfloat16":
        flags.append("--bf16")
    flags += [flag for flag in _NO_FUSIONS if flag in known]
    if cpu:
        flags += ["--distributed-backend", "gloo", "--use-cpu-initialization"]
    return flags


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def combined_ids(native: list[int], image_token: int, tile_tags, num_tiles: int, per_tile: int):
    """NVIDIA's prompt in the LLM's token space: the image token -> per tile its tag ids and
    `per_tile` placeholder positions (LLaVAModel._apply_tile_tagging's order); and the image mask."""
    tags = (tile_tags[: num_tiles - 1] + [tile_tags[-1]]) if tile_tags else [[]] * num_tiles
    ids, mask = [], []
    for token in native:
        if token != image_token or not num_tiles:
            ids.append(token)
            mask.append(0)
            continue
        for tag in tags:
            ids += list(tag) + [image_token] * per_tile
            mask += [0] * len(tag) + [1] * per_tile
    return ids, mask


def _rank_main(work: Path) -> None:
    job = torch.load(work / "job.pt", weights_only=True)
    root = Path(job["megatron_lm"]).resolve()
    sys.path[:0] = [str(root / "examples" / "multimodal"), str(root)]
    cpu = not torch.cuda.is_available()
    _python_compat()
    if cpu:
        cpu_shim.install_for_megatron_lm(one_device_per_rank=True)
    te = te_emulation.install()
    if cpu:
        cpu_shim.megatron_rng()
    _safe_torch_load(job["trust_pickle"])
    no_build_steps()
    chat_template_return_dict()
    _multimodal_tokenizer_path(job["tokenizer"])
    size_changes = _checkpoint_sizes_in_config(job["sizes"])

    from megatron.core.enums import ModelType
    from megatron.training import arguments, get_args, get_tokenizer
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model
    from model import model_provider
    from multimodal_args import add_multimodal_extra_args

    te_emulation.bind(sys.modules["layer_specs"])
    _spec_with_submodules(sys.modules["model"])

    from converter.formats import safe_pickle

    parser = _megatron_parser(arguments.parse_args, add_multimodal_extra_args)
    rank_file = _first_rank_file(Path(job["checkpoint"]))
    stored = safe_pickle.load(rank_file, trust_pickle=job["trust_pickle"], mmap=False)["args"]
    argv = checkpoint_command_line(stored, parser) + list(job["extra_flags"]) + _run_flags(job, parser, cpu)
    sys.argv = [str(root / "examples" / "multimodal" / "run_text_generation.py"), *argv]
    if hasattr(arguments, "parse_and_validate_args"):  # Megatron-LM 0.19+
        arguments.parse_and_validate_args(extra_args_provider=add_multimodal_extra_args)
        initialize_megatron(allow_no_cuda=cpu)
    else:
        initialize_megatron(extra_args_provider=add_multimodal_extra_args, allow_no_cuda=cpu)
    _tokenizer_prompt_config()
    args = get_args()
    model_type = getattr(ModelType, "encoder_and_decoder", ModelType.encoder_or_decoder)
    model = get_model(
        functools.partial(model_provider, parallel_output=False), model_type=model_type, wrap_with_ddp=False
    )
    loaded = load_checkpoint(model, None, None)
    iteration = loaded[0] if isinstance(loaded, tuple) else loaded
    model = model[0].eval()
    result = _forward_cases(model, get_tokenizer(), job, cpu)
    if torch.distributed.get_rank() == 0:
        import megatron.core as core

        result["info"] = {
            "megatron_lm": str(root),
            "megatron_core": f"{core.__file__.rsplit('/megatron/', 1)[0]} ({_core_version()})",
            "transformer_engine": "emulated" if te else "installed",
            "te_emulation": te,
            "size_overrides": list(dict.fromkeys(size_changes)),
            "command_line": argv,
            "iteration_loaded": int(iteration),
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "padded_vocab_size": args.padded_vocab_size,
            "prompt_format": args.tokenizer_prompt_format,
            "device": "CPU" if cpu else torch.cuda.get_device_name(0),
        }
        torch.save(result, work / "result.pt")
    torch.distributed.barrier()


def _core_version() -> str:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except ImportError:
        return "?"


def _first_rank_file(checkpoint: Path) -> Path:
    from converter.formats.legacy import find_iteration_dir

    iteration_dir = find_iteration_dir(checkpoint)[0]
    return sorted(iteration_dir.glob("mp_rank_*/model_optim_rng.pt"))[0]


def _forward_cases(model, tokenizer, job: dict, cpu: bool) -> dict:
    from megatron.core.models.multimodal.llava_model import IMAGE_TOKEN

    from .runner import _LayerRecorder

    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    inner = _unwrap(model)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tile_tags = getattr(inner, "_tile_tags", None)
    dtype = torch.bfloat16 if job["dtype"] == "bfloat16" else torch.float32
    vocab = job["true_vocab"]
    cases = []
    for case in job["cases"]:
        native = [int(t) for t in tokenizer.tokenize_conversation(case["conversation"], False, True)]
        pixels = case.get("pixel_values")
        tiles = int(case.get("num_tiles") or 0)
        images = (
            pixels.to(device, dtype) if pixels is not None else torch.tensor([], dtype=dtype, device=device)
        )
        num_tiles = torch.tensor([tiles] if pixels is not None else [], dtype=torch.int32, device=device)

        def forward(ids, images=images, num_tiles=num_tiles):
            ids = torch.tensor([ids], dtype=torch.int64, device=device)
            positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
            with torch.no_grad():
                logits, _ = model(images, ids, positions, None, num_image_tiles=num_tiles)
            return logits[..., :vocab].float()

        entry = {"native_ids": native}
        recorder = _LayerRecorder(inner) if job["collect_layers"] and job["logits"] else None
        try:
            logits = forward(native)
        finally:
            if recorder is not None:
                recorder.remove()
        per_tile = 0
        if tiles:
            tags = (tile_tags[: tiles - 1] + [tile_tags[-1]]) if tile_tags else []
            per_tile = (logits.shape[1] - (len(native) - 1) - sum(map(len, tags))) // tiles
        combined, mask = combined_ids(native, image_token, tile_tags, tiles, per_tile)
        if len(combined) != logits.shape[1]:
            raise RuntimeError(f"{len(combined)} combined tokens for {logits.shape[1]} logits rows")
        entry.update(combined_ids=combined, image_mask=mask)
        if job["logits"]:
            entry.update(logits=logits.cpu(), layers=dict(recorder.outputs) if recorder is not None else {})
        if job["generate_tokens"]:
            entry["generated"] = _greedy(
                forward, native, job["generate_tokens"], job["eos_token_id"], device, first=logits
            )
        cases.append(entry)
    return {"cases": cases, "image_token_id": image_token, "tile_tags": tile_tags}


def _greedy(forward, native: list[int], steps: int, eos: int | None, device, first=None) -> list[int]:
    """Greedy tokens: each step one full forward over prompt + tokens so far (no KV cache), the
    argmax of the last position (`first`: the prompt's logits, already computed); rank 0's choice
    is broadcast so all ranks continue alike."""
    ids, new = list(native), []
    for step in range(steps):
        logits = first if step == 0 and first is not None else forward(ids)
        best = logits[0, -1].argmax().reshape(1).to(device)
        torch.distributed.broadcast(best, src=0)
        token = int(best.item())
        ids.append(token)
        new.append(token)
        if eos is not None and token == eos:
            break
    return new


def describe(info: dict) -> str:
    """One line saying which Megatron code produced a result."""
    te = "TE emulated" if info.get("transformer_engine") == "emulated" else "Transformer Engine"
    return (
        f"NVIDIA's model code from {info['megatron_lm']} (megatron-core {info['megatron_core']}; {te}), "
        f"TP={info['tensor_model_parallel_size']} PP={info['pipeline_model_parallel_size']}, {info['device']}"
    )


def _prompt_main(work: Path) -> None:
    request = torch.load(work / "prompts.pt", weights_only=True)
    root = Path(request["megatron_lm"])
    sys.path[:0] = [str(root / "examples" / "multimodal"), str(root)]
    _python_compat()
    te_emulation.install()
    chat_template_return_dict()
    _multimodal_tokenizer_path(request["tokenizer"])
    from megatron.training import arguments
    from multimodal_args import add_multimodal_extra_args

    parser = _megatron_parser(arguments.parse_args, add_multimodal_extra_args)
    args, _ = parser.parse_known_args(request["flags"])
    args.rank, args.world_size = 0, 1
    try:  # Megatron-LM 0.19+
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    except ImportError:
        from megatron.training.tokenizer import build_tokenizer
    tokenizer = build_tokenizer(args)
    if not hasattr(tokenizer, "_prompt_config") and hasattr(
        getattr(tokenizer, "_tokenizer", None), "_prompt_config"
    ):
        tokenizer._prompt_config = tokenizer._tokenizer._prompt_config
    from megatron.core.models.multimodal.llava_model import IMAGE_TOKEN
    from model import _get_tile_tags

    native = [
        [int(t) for t in tokenizer.tokenize_conversation(c, False, True)] for c in request["conversations"]
    ]
    result = {
        "native": native,
        "tile_tags": [[int(t) for t in tag] for tag in _get_tile_tags(args, tokenizer)],
        "image_token_id": int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),
    }
    torch.save(result, work / "result.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["--prompts"]:
        _prompt_main(Path(sys.argv[1]))
    else:
        _rank_main(Path(sys.argv[1]))
