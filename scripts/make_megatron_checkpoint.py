"""Build NVLM-D with Megatron-Core at TP x PP ranks and save a Megatron-LM checkpoint of it.

    python scripts/make_megatron_checkpoint.py --preset tiny --tp 2 --pp 2 --format torch OUT
    python scripts/make_megatron_checkpoint.py --preset nvlm-d-72b --tp 8 --format torch --shapes-only OUT

Starts TP*PP processes (gloo on CPU, NCCL on GPUs), builds the LLaVAModel of each rank, fills it
with seeded weights that do not depend on the parallel layout (checkpoints of one seed at any
TP/PP hold the same model), and saves it the way Megatron-LM does (see
modeling/megatron/checkpoint.py). The output appears only when complete: ranks write into a
temporary sibling folder that is renamed at the end.

Memory: a 72B slice at TP=8 fits a 24 GiB machine (it did not before issue 17): no rank draws a
whole global tensor (modeling/megatron/weights.fill_seeded_weights draws in blocks of rows, the same
values bit for bit) and ranks build on the meta device and fill and save in turns
(modeling/megatron/checkpoint.save_rank).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.megatron.builder import ParallelLayout  # noqa: E402
from modeling.megatron.checkpoint import (  # noqa: E402
    CheckpointJob,
    save_rank,
)
from modeling.megatron.distributed import run_ranks  # noqa: E402
from modeling.presets import PRESETS  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), required=True)
@click.option("--num-layers", type=int, help="LLM layers (default: the preset's).")
@click.option("--vision-num-layers", type=int, help="ViT layers (default: the preset's).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor parallel size.")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline parallel size.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "torch_dist"]),
    default="torch",
    show_default=True,
    help="torch: legacy per-rank model_optim_rng.pt; torch_dist: megatron.core.dist_checkpointing.",
)
@click.option(
    "--spec",
    type=click.Choice(["local", "te"]),
    default="local",
    show_default=True,
    help="Parameter names of Megatron-Core's local layers, or of Transformer Engine layers "
    "(input norms fused into the next linear, _extra_state entries). Without Transformer "
    "Engine installed, the te names are emulated from the local model's tensors.",
)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@click.option(
    "--make-vocab-size-divisible-by",
    "divisible_by",
    type=int,
    default=128,
    show_default=True,
    help="Megatron pads the vocabulary to a multiple of this times TP.",
)
@click.option(
    "--shapes-only",
    is_flag=True,
    help="Write tensors that carry shapes and dtypes but no data (meta tensors): describes "
    "the full 72B model without 160 GB.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.argument("out", type=click.Path(path_type=Path))
def main(
    preset,
    num_layers,
    vision_num_layers,
    tp,
    pp,
    fmt,
    spec,
    seed,
    dtype,
    divisible_by,
    shapes_only,
    overwrite,
    out,
):
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise click.UsageError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if shapes_only and fmt != "torch":
        raise click.UsageError("--shapes-only writes the legacy torch format only")
    overrides = {}
    if num_layers is not None:
        overrides["llm_num_hidden_layers"] = num_layers
    if vision_num_layers is not None:
        overrides["vision_num_hidden_layers"] = vision_num_layers
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    job = CheckpointJob(
        preset=preset,
        overrides=overrides,
        layout=ParallelLayout(tp, pp),
        out=str(tmp),
        fmt=fmt,
        spec=spec,
        seed=seed,
        shapes_only=shapes_only,
        dtype=dtype,
        divisible_by=divisible_by,
    )
    try:
        summary = run_ranks(save_rank, job.layout, job)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    click.echo(
        f"wrote {out}: {preset}, TP={tp} PP={pp}, {fmt}, spec {spec}, padded vocab "
        f"{summary['padded_vocab_size']}, {summary['parameters']:,} parameters on rank 0"
    )


if __name__ == "__main__":  # guarded: the ranks (and torch_dist's writer) re-import this module
    main()
