"""`convert-checkpoint`: Megatron-Core <-> Hugging Face conversion of NVLM-D (and Qwen2) checkpoints."""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
from pathlib import Path

import click
import torch

from .errors import ClearErrorGroup, ConversionError
from .tokenizer_folder import TOKENIZER_FILES, tokenizer_info, tokenizer_size

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def _dtype_policy(choice: str, family):
    if choice == "official":
        return lambda name, source: family.official_dtype(name)
    if choice == "source":
        return lambda name, source: source
    return lambda name, source, fixed=DTYPES[choice]: fixed


def _convert_to_hf(
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
    resume=False,
    workers=1,
    vision_real_heads=None,
    reference_config=None,
):
    from .engine import (
        atomic_folder,
        execute_megatron_to_hf,
        leftover_partials,
        open_megatron,
        plan_megatron_to_hf,
    )
    from .families import family_for_args
    from .formats.safetensors_stream import assign_shards, parse_size, shard_names
    from .manifest import seal, source_record, tool
    from .model_card import write_card
    from .reference_config import (
        apply_reference,
        generation_defaults,
        load_reference,
        write_generation_defaults,
    )

    if tokenizer is None and not no_tokenizer and not dry_run:
        raise click.UsageError("--tokenizer DIR is required (or pass --no-tokenizer)")
    ckpt = open_megatron(src, iteration=iteration, trust_pickle=trust_pickle)
    if ckpt.note:
        click.echo(f"note: {ckpt.note}", err=True)
    family = family_for_args(ckpt.args)
    try:
        config = family.hf_config(
            ckpt.args,
            ckpt=ckpt,
            tokenizer=tokenizer_info(tokenizer, getattr(family, "image_token", "<|vision_pad|>")),
            vision_real_heads=vision_real_heads,
        )
        table = family.table(config, getattr(ckpt.args, "make_vocab_size_divisible_by", 128))
        expected = family.expected(config)
    except Exception as exc:  # the config class (strict field types), torch (negative sizes), arithmetic
        reason = " ".join(str(exc).split())[:300]
        raise ConversionError(
            f"{ckpt.iteration_dir}: the checkpoint's args do not describe a {family.name} model "
            f"({type(exc).__name__}: {reason})"
        ) from None
    reference = None
    if reference_config is not None:  # before anything is planned or written: a disagreement stops here
        reference = load_reference(reference_config)
        config = apply_reference(family, config, reference, ckpt.iteration_dir)
    steps = plan_megatron_to_hf(ckpt, table, expected, _dtype_policy(dtype, family))
    limit = parse_size(max_shard_size)
    planned = [t for s in steps for t in s.targets]
    shards = assign_shards(planned, limit)
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in planned)
    click.echo(
        f"{src}: {ckpt.format}, TP={ckpt.tp} PP={ckpt.pp}, {family.name}: {len(steps)} source tensors -> "
        f"{len(planned)} HF tensors, {total:,} bytes in {len(shards)} shard(s)"
    )
    if plan_json:
        plan = {
            "tensors": {
                t.name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "shard": name}
                for shard, name in zip(shards, names)
                for t in shard
            },
            "total_size": total,
        }
        Path(plan_json).write_text(json.dumps(plan, indent=1) + "\n")
    if dry_run:
        return
    leftovers = leftover_partials(Path(dst))
    if leftovers and not resume:
        click.echo(
            f"note: {leftovers[-1]} is left from an interrupted conversion to {dst}; "
            "--resume reuses its finished shards",
            err=True,
        )
    with atomic_folder(Path(dst), overwrite=overwrite, resume=resume, sources=[src]) as folder:
        written = execute_megatron_to_hf(
            ckpt, steps, folder, limit, check_finite=check_finite, resume=resume, workers=workers
        )
        if resume:
            click.echo(f"resume: {len(written.reused)} of {len(shards)} shard(s) reused, the rest written")
        if dtype in ("official", "bf16"):
            config.dtype = torch.bfloat16
        elif dtype in DTYPES:
            config.dtype = DTYPES[dtype]
        else:  # source: the dtype most of the bytes have (what from_pretrained(dtype="auto") takes)
            by_dtype = collections.Counter()
            for target in planned:
                by_dtype[target.dtype] += target.nbytes
            config.dtype = by_dtype.most_common(1)[0][0]
        family.write_extras(folder, config)
        if reference is not None:
            write_generation_defaults(folder, generation_defaults(family, reference))
        if tokenizer is not None:
            for name in TOKENIZER_FILES:  # what the family wrote (e.g. chat_template.jinja) wins
                if (Path(tokenizer) / name).exists() and not (folder / name).exists():
                    shutil.copyfile(Path(tokenizer) / name, folder / name)
        record = source_record(ckpt, dtype)
        card_fields = dict(reference.card, reference_sha256=reference.sha256) if reference else {}
        write_card(folder, family=family, source=record, tool=tool(), digests=written.digests, **card_fields)
        seal(folder, record, written.digests)
    click.echo(f"wrote {dst}")


@main.command("megatron-to-hf")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path), required=False)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    help="Tokenizer folder copied into DST (required "
    "unless --no-tokenizer); its <|vision_pad|> id goes into config.json.",
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
    if dst is None and not dry_run:
        raise click.UsageError("DST is required unless --dry-run")
    _convert_to_hf(
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
        workers=workers,
        vision_real_heads=vision_real_heads,
        reference_config=reference_config,
    )


def _write_megatron(
    hf_dir: Path, dst: Path, tp: int, pp: int, fmt: str, overwrite: bool, divisible_by: int, sources=()
):
    from mappings.transforms import LayoutError

    from .engine import atomic_folder, check_output_location, leftover_partials
    from .families import family_for_hf_config
    from .megatron_writers import (
        HFSource,
        check_against_config,
        check_layer_counts,
        check_layout,
        hf_steps,
        write_legacy,
        write_torch_dist,
    )

    check_output_location(dst, [hf_dir, *sources])
    config_path = Path(hf_dir) / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face folder)")
    try:
        config_json = json.loads(config_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{config_path}: not JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(config_json, dict):
        raise ConversionError(f"{config_path}: holds a {type(config_json).__name__}, not a JSON object")
    family = family_for_hf_config(config_json)
    source = HFSource(hf_dir)
    check_layer_counts(source, config_json, config_path)
    try:
        config = family.config_class()(**config_json)
        table = family.table(config, divisible_by)
        expected = family.expected(config)
    except Exception as exc:  # the config class, the table or the shapes: config.json's values
        reason = " ".join(str(exc).split())[:300]  # one line, whatever the library's message
        raise ConversionError(
            f"{config_path}: does not describe a {family.name} model ({type(exc).__name__}: {reason})"
        ) from None
    missing = set(expected) - set(source.where)
    if missing:
        raise ConversionError(f"{hf_dir}: missing tensors: {sorted(missing)[:5]}")
    extra = sorted(set(source.where) - set(expected))
    if extra:
        raise ConversionError(
            f"{source.folder / source.where[extra[0]]}: {extra[0]} is a tensor config.json does not "
            f"describe ({len(extra)} such tensor(s)); it would be dropped"
        )
    check_against_config(source, expected, config_path)
    steps = hf_steps(table, list(expected))
    dtype = source.meta(next(iter(expected))).dtype  # from the file header, no data read
    tokenizer_vocab = tokenizer_size(Path(hf_dir))
    try:
        args = family.megatron_args(
            config, tp, pp, dtype=dtype, divisible_by=divisible_by, tokenizer_vocab=tokenizer_vocab
        )
    except (ValueError, ZeroDivisionError, LayoutError) as exc:
        raise ConversionError(f"{config_path}: cannot be laid out at TP={tp} PP={pp} ({exc})") from None
    if args.num_layers % pp:
        raise ConversionError(f"{config_path}: {args.num_layers} layers do not divide into PP={pp} stages")
    check_layout(steps, source, tp, config_path)
    for leftover in leftover_partials(Path(dst)):
        click.echo(f"note: {leftover} is left from an interrupted run to {dst} (not reused)", err=True)
    with atomic_folder(dst, overwrite=overwrite, sources=[hf_dir, *sources]) as folder:
        writer = write_legacy if fmt == "torch" else write_torch_dist
        writer(folder, args, steps, source)
    click.echo(f"wrote {dst}: TP={tp} PP={pp} {fmt}")


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
    _write_megatron(src, dst, tp, pp, fmt, overwrite, divisible_by)


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
    from .engine import check_output_location, open_megatron

    check_output_location(dst, [src])
    ckpt = open_megatron(src, trust_pickle=trust_pickle)
    divisible_by = getattr(ckpt.args, "make_vocab_size_divisible_by", 128)
    with tempfile.TemporaryDirectory(
        prefix=".reshard-", dir=Path(dst).parent if Path(dst).parent.exists() else None
    ) as tmp:
        middle = Path(tmp) / "hf"
        _convert_to_hf(
            src, middle, None, True, "source", "4GB", False, None, None, trust_pickle, False, False
        )
        try:
            _write_megatron(middle, dst, tp, pp, fmt or ckpt.format, overwrite, divisible_by, sources=[src])
        except ConversionError as exc:  # name the user's checkpoint, not the intermediate folder
            reason = str(exc).replace(f"{middle / 'config.json'}: ", "").replace(f"{middle}: ", "")
            raise ConversionError(f"{src}: cannot reshard to TP={tp} PP={pp}: {reason}") from None


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--trust-pickle", is_flag=True)
def inspect(src, trust_pickle):
    """Format, parallel layout, iteration, key args, tensor count and bytes of a Megatron checkpoint."""
    from modeling.megatron.args import generation_of

    from .engine import open_megatron

    ckpt = open_megatron(src, trust_pickle=trust_pickle)
    args = ckpt.args
    names = ckpt.names()
    total = sum(ckpt.nbytes(name) for name in names)
    click.echo(f"{'path':<28}{src}")
    click.echo(f"{'format':<28}{ckpt.format}")
    click.echo(f"{'iteration':<28}{ckpt.iteration_dir.name}")
    click.echo(f"{'parallel layout':<28}TP={ckpt.tp} PP={ckpt.pp} VP={ckpt.vp}")
    click.echo(f"{'args names':<28}{generation_of(args)}")
    if getattr(ckpt, "generation", ""):
        click.echo(f"{'common state':<28}{ckpt.generation}")
    for key in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "ffn_hidden_size",
        "padded_vocab_size",
        "encoder_num_layers",
        "vision_hidden_size",
        "vision_num_attention_heads",
    ):
        if hasattr(args, key):
            click.echo(f"{key:<28}{getattr(args, key)}")
    click.echo(f"{'tensors':<28}{len(names)}")
    click.echo(f"{'bytes (as stored)':<28}{total:,}")


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
