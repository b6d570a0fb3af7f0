"""One rank's Megatron NVLM-D model, from a seed or from a legacy checkpoint, and forward jobs.

`run_ranks(forward_rank, layout, ForwardJob(...))` builds the model on every rank, runs the
same inputs the Hugging Face class gets, and returns rank 0's outputs (see runner.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state

from converter.families.nvlm_d import config_from_args

from .builder import ParallelLayout, build_llava, padded_vocab_size
from .checkpoint import load_legacy_state, te_names
from .runner import MegatronRunner
from .weights import fill_seeded_weights


@dataclass
class ModelSource:
    """Seeded weights of a preset, or a legacy checkpoint folder."""

    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    seed: int = 1234
    divisible_by: int = 128
    checkpoint: str | None = None
    trust_pickle: bool = False  # --trust-pickle: the checkpoint's pickles skip the allow-lists


@dataclass
class ForwardJob:
    source: ModelSource
    layout: ParallelLayout
    cases: list[dict]  # each {"input_ids": [b, s], "pixel_values": [tiles, 3, H, W] or None}
    dtype: str = "float32"
    collect_layers: bool = False
    native: list[dict] = field(default_factory=list)  # {"input_ids", "pixel_values", "num_tiles"}
    tile_tag_ids: list[list[int]] | None = None
    image_token_id: int | None = None  # default: the config's img_context_token_id
    generate_tokens: int = 0  # greedy continuation of each case (0: none)
    eos_token_id: int | None = None
    generate_batch: int = 1  # cases generated together (right-padded batches)
    logits: bool = True  # False: only the greedy continuations (benchmarks)


def open_checkpoint(checkpoint: str | Path, trust_pickle: bool = False):
    """The checkpoint through the converter's readers: every pickle (rank files, `common.pt`,
    `.metadata`, the common state) unpickled safely, sizes and storage paths checked
    (converter/formats/safe_pickle.py); ConversionError naming the file otherwise."""
    from converter.families import PIPELINED_STACKS
    from converter.formats import reader

    return reader.open_checkpoint(
        Path(checkpoint), trust_pickle=trust_pickle, pipelined_stacks=PIPELINED_STACKS
    )


def read_args(checkpoint: str | Path, trust_pickle: bool = False) -> argparse.Namespace:
    """The checkpoint's Megatron args, read safely (see open_checkpoint)."""
    return open_checkpoint(checkpoint, trust_pickle).args


def build_rank_model(source: ModelSource, layout: ParallelLayout, dtype: torch.dtype, tile_tag_ids=None):
    """This rank's LLaVAModel with its weights, its NVLM_D_Config, and the true vocab size."""
    from ..presets import get_config, tokenizer_size

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    cpu = not torch.cuda.is_available()
    ckpt = open_checkpoint(source.checkpoint, source.trust_pickle) if source.checkpoint else None
    if ckpt is not None:
        args = ckpt.args
        if (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) != (layout.tp, layout.pp):
            raise ValueError(
                f"{source.checkpoint} was saved at TP={args.tensor_model_parallel_size} "
                f"PP={args.pipeline_model_parallel_size}; run it with that layout"
            )
        from converter.families import CheckpointTensors

        # sizes from the tensors, as the converter takes them: NVLM-1.0's args hold no ViT size
        config = config_from_args(args, tensors=CheckpointTensors(ckpt))
        vocab, padded = args.vocab_size, args.padded_vocab_size
    else:
        config = get_config(source.preset, **source.overrides)
        vocab = tokenizer_size(source.preset)
        padded = padded_vocab_size(vocab, layout.tp, source.divisible_by)
    model = build_llava(
        config,
        layout,
        pp_rank=pp_rank,
        vocab_size=padded,
        tile_tag_ids=tile_tag_ids,
        image_token_index=config.img_context_token_id if config.img_context_token_id is not None else 0,
        dtype=dtype,
        cpu=cpu,
    )
    if ckpt is not None and ckpt.format == "torch_dist":
        from megatron.core import dist_checkpointing

        # megatron-core unpickles .metadata and the byte objects unsafely: parity-check has checked
        # every one of them (converter/parity/checkpoint_safety.py) before the ranks started.
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt.iteration_dir))
        for common in ("args", "checkpoint_version", "iteration"):  # common.pt entries come back too
            state.pop(common, None)
        model.load_state_dict(state, strict=True)
    elif ckpt is not None:
        state = load_legacy_state(
            source.checkpoint,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            pp_rank=pp_rank,
            pp=layout.pp,
            iteration=ckpt.opened_with["iteration"],
            trust_pickle=source.trust_pickle,
        )
        if _uses_te(model):
            state = te_names(state)
        model.load_state_dict(state, strict=True)
    else:
        fill_seeded_weights(model, config, vocab_real=vocab, seed=source.seed)
    if not cpu:
        model.cuda()
    return model, config, vocab


def _uses_te(model) -> bool:
    return any(name.endswith("linear_qkv.layer_norm_weight") for name in model.state_dict())


def forward_rank(rank: int, job: ForwardJob) -> dict | None:
    dtype = getattr(torch, job.dtype)
    model, config, vocab = build_rank_model(job.source, job.layout, dtype, job.tile_tag_ids)
    device = (
        torch.device("cpu")
        if not torch.cuda.is_available()
        else torch.device("cuda", torch.cuda.current_device())
    )
    image_token = job.image_token_id if job.image_token_id is not None else config.img_context_token_id
    if image_token is None:
        raise ValueError("the image placeholder id is unknown: pass ForwardJob.image_token_id")
    runner = MegatronRunner(model, image_token_id=image_token, true_vocab=vocab, device=device)
    outputs = [
        runner.forward(case["input_ids"], case.get("pixel_values"), collect_layers=job.collect_layers)
        for case in (job.cases if job.logits else [])
    ]
    native = [runner.forward_native(c["input_ids"], c["pixel_values"], c["num_tiles"]) for c in job.native]
    # Batches of similar prompt lengths waste little on padding; results go back in case order.
    order = sorted(
        range(len(job.cases) if job.generate_tokens else 0), key=lambda k: job.cases[k]["input_ids"].shape[1]
    )
    by_case = {}
    for start in range(0, len(order), job.generate_batch):
        chosen = order[start : start + job.generate_batch]
        batch = [(job.cases[k]["input_ids"], job.cases[k].get("pixel_values")) for k in chosen]
        by_case.update(
            zip(chosen, runner.generate_greedy_batch(batch, job.generate_tokens, job.eos_token_id) or [])
        )
    generated = [by_case[k] for k in sorted(by_case)]
    return {"outputs": outputs, "native": native, "generated": generated} if rank == 0 else None
