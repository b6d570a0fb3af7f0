"""Save and load Megatron NVLM-D checkpoints the way Megatron-LM does.

Legacy `torch` format:
    DIR/latest_checkpointed_iteration.txt            "1"
    DIR/iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args": argparse.Namespace, "checkpoint_version": 3.0, "iteration": 1,
         "model": the rank's state_dict_for_save_checkpoint()}
Distributed `torch_dist` format:
    DIR/iter_0000001/ written by megatron.core.dist_checkpointing.save: metadata.json, .metadata,
    __R_K.distcp files, and common.pt (args, checkpoint_version, iteration).

`--spec te` checkpoints carry Transformer Engine's parameter names: the LLM input norms fused
into the next linear (`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`) and
`_extra_state` entries. Without TE installed those names are emulated from the local model's
tensors (`te_names`), which is exactly the state dict TE would have produced for these weights.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# the folder layout of the legacy format has one home: the converter's reader/writer
from converter.formats import legacy
from converter.formats.legacy import write_tracker  # noqa: F401  (re-exported for the scripts)

CHECKPOINT_VERSION = 3.0

_TE_RENAMES = (
    (
        re.compile(r"(decoder\.layers\.\d+\.)input_layernorm\.weight$"),
        r"\1self_attention.linear_qkv.layer_norm_weight",
    ),
    (
        re.compile(r"(decoder\.layers\.\d+\.)pre_mlp_layernorm\.weight$"),
        r"\1mlp.linear_fc1.layer_norm_weight",
    ),
)
# What Transformer Engine stores as a module's extra state when FP8 is off: an empty byte tensor.
_TE_EMPTY_EXTRA_STATE = torch.empty(0, dtype=torch.uint8)


def te_names(state_dict: dict) -> dict:
    """A local-spec state dict under Transformer Engine's names (see module docstring)."""
    out = {}
    for key, value in state_dict.items():
        key = _te_key(key)
        if key.startswith("language_model.") and key.endswith("._extra_state"):
            value = _TE_EMPTY_EXTRA_STATE.clone()
        out[key] = value
        if key.startswith("language_model.") and key.endswith("self_attention.linear_proj.weight"):
            core = key.replace("linear_proj.weight", "core_attention._extra_state")
            out[core] = _TE_EMPTY_EXTRA_STATE.clone()
    return out


def local_names(state_dict: dict) -> dict:
    """Inverse of te_names: TE's fused-norm names back to the local spec's, TE-only entries dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("language_model."):
            key = key.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
            key = key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
            if key.endswith("core_attention._extra_state"):
                continue
            if key.endswith("._extra_state"):
                value = None
        out[key] = value
    return out


def save_legacy(model, root: Path, args, *, iteration: int, tp_rank: int, pp_rank: int, spec: str) -> Path:
    state = model.state_dict_for_save_checkpoint()
    if spec == "te":
        state = te_names(state)
    path = legacy.rank_dir(root, iteration, tp_rank, pp_rank, args.pipeline_model_parallel_size)
    path.mkdir(parents=True, exist_ok=True)
    target = path / "model_optim_rng.pt"
    torch.save(
        {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": state},
        target,
    )
    return target


def save_torch_dist(model, root: Path, args, *, iteration: int, spec: str) -> Path:
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    if spec == "te":
        sharded = _renamed_sharded(sharded)
    path = Path(root) / legacy.iteration_name(iteration)
    path.mkdir(parents=True, exist_ok=True)
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": sharded}
    dist_checkpointing.save(state, str(path))
    return path


def _te_key(key: str) -> str:
    if key.startswith("language_model."):
        for pattern, replacement in _TE_RENAMES:
            key = pattern.sub(replacement, key)
    return key


def _renamed_sharded(sharded: dict) -> dict:
    """TE names in a sharded state dict: the dict keys and each sharded tensor's global key."""
    out = {}
    for key, value in sharded.items():
        if hasattr(value, "key"):
            value.key = _te_key(value.key)
        out[_te_key(key)] = value
    return out


def load_legacy_state(
    root: Path,
    *,
    tp_rank: int,
    pp_rank: int,
    pp: int,
    iteration: int | str | None = None,
    trust_pickle: bool = False,
) -> dict:
    """The `model` state dict of one rank of a legacy checkpoint, unpickled through the
    converter's allow-list (converter/formats/safe_pickle.py) unless `trust_pickle`."""
    from converter.formats import safe_pickle

    root = Path(root)
    if iteration is None:
        iteration = (root / legacy.TRACKER).read_text().strip()
    path = legacy.rank_dir(root, iteration, tp_rank, pp_rank, pp) / "model_optim_rng.pt"
    state = safe_pickle.load(path, trust_pickle=trust_pickle, mmap=False)["model"]
    return local_names(state)


@dataclass
class CheckpointJob:
    """What scripts/make_megatron_checkpoint.py asks every rank to do."""

    preset: str
    overrides: dict
    layout: object  # ParallelLayout
    out: str
    fmt: str = "torch"  # or "torch_dist"
    spec: str = "local"  # or "te"
    seed: int = 1234
    shapes_only: bool = False
    dtype: str = "float32"
    divisible_by: int = 128
    iteration: int = 1


def save_rank(rank: int, job: CheckpointJob) -> dict:
    """Build this rank's model, fill it with the seeded weights, save its part of the checkpoint
    (scripts/make_megatron_checkpoint.py), in bounded memory: the model is built on the meta device
    and a rank allocates its tensors only when it fills and saves them; for the legacy format (each
    rank writes its own file) only as many ranks as CPU cores do so at a time (filling is CPU-bound),
    each freeing its tensors once its file is written. torch_dist's save is collective: all ranks
    hold their shard then, never a global tensor (weights.fill_seeded_weights draws in blocks)."""
    from megatron.core import parallel_state

    from ..presets import get_config, tokenizer_size
    from .args import megatron_args
    from .builder import build_llava, padded_vocab_size
    from .weights import fill_seeded_weights

    config = get_config(job.preset, **job.overrides)
    layout = job.layout
    dtype = getattr(torch, job.dtype)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    vocab = tokenizer_size(job.preset)
    padded = padded_vocab_size(vocab, layout.tp, job.divisible_by)
    with torch.device("meta"):  # allocated when filled
        model = build_llava(
            config,
            layout,
            pp_rank=pp_rank,
            vocab_size=padded,
            tile_tag_ids=None,
            image_token_index=config.img_context_token_id,
            dtype=dtype,
            cpu=not torch.cuda.is_available(),
        )
    parameters = sum(p.numel() for p in model.parameters())
    args = megatron_args(
        config,
        layout,
        padded_vocab=padded,
        divisible_by=job.divisible_by,
        dtype=dtype,
        spec=job.spec,
        tokenizer_vocab=vocab,
    )
    args.seed = job.seed

    def fill():
        if not job.shapes_only:
            materialise(model)
            fill_seeded_weights(model, config, vocab_real=vocab, seed=job.seed)

    if job.fmt == "torch":
        for turn in _turns(rank, layout.world_size):
            if turn:
                fill()
                save_legacy(
                    model,
                    Path(job.out),
                    args,
                    iteration=job.iteration,
                    tp_rank=tp_rank,
                    pp_rank=pp_rank,
                    spec=job.spec,
                )
                model = None  # this rank's tensors freed before the next ranks fill theirs
    else:
        fill()
        save_torch_dist(model, Path(job.out), args, iteration=job.iteration, spec=job.spec)
    if rank == 0:
        write_tracker(Path(job.out), job.iteration)
    return {"padded_vocab_size": padded, "parameters": parameters}


def _turns(rank: int, world_size: int):
    """Yields once per turn, True on this rank's: as many ranks per turn as CPU cores, a barrier
    between turns."""
    import torch.distributed as dist

    at_once = max(1, min(world_size, os.cpu_count() or 1))
    for turn in range(math.ceil(world_size / at_once)):
        yield rank // at_once == turn
        dist.barrier()


def materialise(model) -> None:
    """The meta-device model's parameters as (uninitialised) CPU tensors, each keeping the
    attributes Megatron put on it (tensor_model_parallel, partition_dim, ...)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            real = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype), param.requires_grad)
            real.__dict__.update(param.__dict__)
            module._parameters[name] = real
    stored = {name for name, _ in model.named_buffers() if name in model.state_dict()}
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta and name in stored]
    if left:  # a saved buffer would need its value computed at build time: not on meta
        raise RuntimeError(f"buffers without values after a meta-device build: {left[:4]}")
