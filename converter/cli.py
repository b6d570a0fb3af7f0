"""`convert-checkpoint`: Megatron-Core <-> Hugging Face conversion (the click commands; what they do
is converter/api.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import ClearErrorGroup


@click.group(cls=ClearErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nvlm-port")
def main() -> None:
    """Convert NVLM-D checkpoints between Megatron-Core (legacy `torch` and `torch_dist`, any TP/PP)
    and Hugging Face safetensors that load into the NVLM_D model class (and plain Qwen2 GPT
    checkpoints into Qwen2ForCausalLM). Output folders appear only when complete."""


def _shard_size(ctx, param, value):
    """--max-shard-size checked by click (a usage error, exit 2): '4GB', '500MB', '2GiB' or bytes."""
    from .formats.safetensors_stream import parse_size

    try:
        if parse_size(value) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size such as 4GB, 500MB, 2GiB or 1000000") from None
    return value


@main.command("megatron-to-hf")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path), required=False)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    help="Tokenizer folder copied into DST (required "
    "unless --no-tokenizer); the id of the model's image token in it goes into config.json.",
)
@click.option("--no-tokenizer", is_flag=True, help="Write no tokenizer files.")
@click.option(
    "--dtype",
    type=click.Choice(["source", "official", "bf16", "fp16", "fp32"]),
    default="source",
    show_default=True,
    help="official: the release's per-tensor dtypes (attention projections in "
    "float32, the rest bfloat16); source: keep each tensor's dtype.",
)
@click.option("--max-shard-size", default="4GB", show_default=True, callback=_shard_size)
@click.option(
    "--dry-run", is_flag=True, help="Read shapes and dtypes only, check the mapping, print the plan."
)
@click.option(
    "--plan-json", type=click.Path(path_type=Path), help="Write the plan (names, shapes, dtypes, shards)."
)
@click.option(
    "--iteration",
    type=int,
    help="Iteration to read (default: the tracker file's; without one, the newest iter_* folder).",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Unpickle globals outside the allow-list (runs code from the file: only for checkpoints you trust).",
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--check-finite", is_flag=True, help="Refuse tensors holding NaN or Inf.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue in the .DST.partial-PID folder a killed run left: shards it finished are kept "
    "(after checking header, size and sha256), the rest are written.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes writing the output shards (each writes whole shards, streaming; same bytes as 1).",
)
@click.option(
    "--vision-real-heads",
    type=click.IntRange(min=1),
    help="Real (non-padding) ViT attention heads, where the checkpoint cannot tell: args of "
    "Megatron-LM's examples/multimodal do not store them, and --vision-model-type internvit means 25.",
)
@click.option(
    "--reference-config",
    type=click.Path(path_type=Path),
    help="The release's config.json (or its folder): copy the fields no Megatron checkpoint carries "
    "(rope_scaling, processing settings, generation defaults; license and base model from its "
    "model card) after checking that every size it states agrees with the checkpoint.",
)
def megatron_to_hf(
    src,
    dst,
    tokenizer,
    no_tokenizer,
    dtype,
    max_shard_size,
    dry_run,
    plan_json,
    iteration,
    trust_pickle,
    overwrite,
    check_finite,
    resume,
    workers,
    vision_real_heads,
    reference_config,
):
    """Convert a Megatron checkpoint SRC (legacy or torch_dist, any TP/PP/VP) to a Hugging Face folder DST.

    DST appears only when complete, with nvlm_port_manifest.json (sha256 of every file); a killed
    run leaves .DST.partial-PID, which --resume continues."""
    from .api import ConvertOptions, convert_megatron_to_hf

    if dst is None and not dry_run:
        raise click.UsageError("DST is required unless --dry-run")
    if tokenizer is None and not no_tokenizer and not dry_run:
        raise click.UsageError("--tokenizer DIR is required (or pass --no-tokenizer)")
    options = ConvertOptions(
        tokenizer=tokenizer,
        no_tokenizer=no_tokenizer,
        dtype=dtype,
        max_shard_size=max_shard_size,
        dry_run=dry_run,
        plan_json=plan_json,
        iteration=iteration,
        trust_pickle=trust_pickle,
        overwrite=overwrite,
        check_finite=check_finite,
        resume=resume,
        workers=workers,
        vision_real_heads=vision_real_heads,
        reference_config=reference_config,
    )
    convert_megatron_to_hf(src, dst, options, log=click.echo, warn=_note)


def _note(message: str) -> None:
    click.echo(message, err=True)


@main.command("hf-to-megatron")
@click.argument("src", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["torch", "torch_dist"]), default="torch", show_default=True
)
@click.option(
    "--make-vocab-size-divisible-by",
    "divisible_by",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
)
@click.option("--overwrite", is_flag=True)
def hf_to_megatron(src, dst, tp, pp, fmt, divisible_by, overwrite):
    """Write a Megatron checkpoint (vocab and ViT heads re-padded as Megatron pads them at TP)."""
    from .api import convert_hf_to_megatron

    convert_hf_to_megatron(
        src,
        dst,
        tp=tp,
        pp=pp,
        fmt=fmt,
        divisible_by=divisible_by,
        overwrite=overwrite,
        log=click.echo,
        warn=_note,
    )


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--tp", type=click.IntRange(min=1), required=True)
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--format", "fmt", type=click.Choice(["torch", "torch_dist"]), help="Default: the source's format."
)
@click.option("--trust-pickle", is_flag=True)
@click.option("--overwrite", is_flag=True)
def reshard(src, dst, tp, pp, fmt, trust_pickle, overwrite):
    """Re-shard a Megatron checkpoint to another TP/PP (and format), through the exact HF layout."""
    from . import api

    api.reshard(
        src,
        dst,
        tp=tp,
        pp=pp,
        fmt=fmt,
        trust_pickle=trust_pickle,
        overwrite=overwrite,
        log=click.echo,
        warn=_note,
    )


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--trust-pickle", is_flag=True)
def inspect(src, trust_pickle):
    """Format, parallel layout, iteration, key args, tensor count and bytes of a Megatron checkpoint."""
    from . import api

    for label, value in api.inspect(src, trust_pickle=trust_pickle):
        click.echo(f"{label:<28}{value}")


@main.command()
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    help="Megatron checkpoint the folder was converted from: compare every tensor, bitwise.",
)
@click.option("--trust-pickle", is_flag=True, help="As for megatron-to-hf (reading --against).")
def verify(hf_dir, against, trust_pickle):
    """Check a Hugging Face folder: index against files, sha256 manifest, names/shapes/dtypes against
    config.json, and with --against, equality with the Megatron source. Exit 0 when all holds,
    1 listing what differs, 2 when the input cannot be read."""
    from .verify import verify_folder

    report = verify_folder(hf_dir, against, trust_pickle)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if report.problems:
        click.echo(f"{hf_dir}: {len(report.problems)} problem(s)")
        for problem in report.problems:
            click.echo(f"  {problem}")
        raise SystemExit(1)
    click.echo(f"{hf_dir}: OK: " + "; ".join(report.checked))


if __name__ == "__main__":
    main()
