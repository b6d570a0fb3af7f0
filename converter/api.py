"""The converter as a library: what each `convert-checkpoint` command does, without click.

    from converter.api import ConvertOptions, convert_megatron_to_hf
    convert_megatron_to_hf("ckpt/", "hf/", ConvertOptions(tokenizer="tok/", dtype="official"))

Every function raises ConversionError (one line naming the file and the problem) on bad input and
writes its output folder only when complete (engine.atomic_folder). Progress lines go to `log`
(stdout by default), notes to `warn` (stderr); converter/cli.py passes click's echo for both.
"""

from __future__ import annotations

import collections
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mappings.transforms import LayoutError

from .engine import (
    atomic_folder,
    check_output_location,
    execute_megatron_to_hf,
    leftover_partials,
    open_megatron,
    plan_megatron_to_hf,
)
from .errors import ConversionError
from .families import family_for_args, family_for_hf_config
from .families.base import FIXED_DTYPES
from .formats.safetensors_stream import assign_shards, parse_size, shard_names
from .megatron_writers import (
    HFSource,
    check_against_config,
    check_layer_counts,
    check_layout,
    hf_steps,
    write_legacy,
    write_torch_dist,
)
from .tokenizer_folder import TOKENIZER_FILES, tokenizer_info, tokenizer_size


def _stdout(message: str) -> None:
    print(message, flush=True)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class ConvertOptions:
    """megatron-to-hf's options (the CLI's --help says what each does)."""

    tokenizer: Path | None = None  # copied into the folder; its image token id into config.json
    no_tokenizer: bool = False
    dtype: str = "source"  # source, official, bf16, fp16, fp32
    max_shard_size: str = "4GB"
    dry_run: bool = False
    plan_json: Path | None = None
    iteration: int | None = None
    trust_pickle: bool = False
    overwrite: bool = False
    check_finite: bool = False
    resume: bool = False
    workers: int = 1
    vision_real_heads: int | None = None
    reference_config: Path | None = None


def convert_megatron_to_hf(
    src: Path,
    dst: Path | None,
    options: ConvertOptions | None = None,
    *,
    log: Callable[[str], None] = _stdout,
    warn: Callable[[str], None] = _stderr,
) -> None:
    """A Megatron checkpoint (legacy or torch_dist, any TP/PP/VP) -> a Hugging Face folder."""
    from .manifest import seal, source_record, tool
    from .model_card import write_card
    from .reference_config import (
        apply_reference,
        generation_defaults,
        load_reference,
        write_generation_defaults,
    )

    options = options or ConvertOptions()
    if options.tokenizer is None and not options.no_tokenizer and not options.dry_run:
        raise ConversionError("a tokenizer folder is required (or no_tokenizer)")
    if dst is None and not options.dry_run:
        raise ConversionError("an output folder is required unless dry_run")
    ckpt = open_megatron(src, iteration=options.iteration, trust_pickle=options.trust_pickle)
    if ckpt.note:
        warn(f"note: {ckpt.note}")
    family = family_for_args(ckpt.args)
    try:
        config = family.hf_config(
            ckpt.args,
            ckpt=ckpt,
            tokenizer=tokenizer_info(options.tokenizer, family.image_token),
            vision_real_heads=options.vision_real_heads,
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
    if (
        options.reference_config is not None
    ):  # before anything is planned or written: a disagreement stops here
        reference = load_reference(options.reference_config)
        config = apply_reference(family, config, reference, ckpt.iteration_dir)
    steps = plan_megatron_to_hf(ckpt, table, expected, family.dtype_policy(options.dtype))
    limit = parse_size(options.max_shard_size)
    planned = [t for s in steps for t in s.targets]
    shards = assign_shards(planned, limit)
    names = shard_names(len(shards))
    total = sum(t.nbytes for t in planned)
    log(
        f"{src}: {ckpt.format}, TP={ckpt.tp} PP={ckpt.pp}, {family.name}: {len(steps)} source tensors -> "
        f"{len(planned)} HF tensors, {total:,} bytes in {len(shards)} shard(s)"
    )
    if options.plan_json:
        plan = {
            "tensors": {
                t.name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "shard": name}
                for shard, name in zip(shards, names)
                for t in shard
            },
            "total_size": total,
        }
        Path(options.plan_json).write_text(json.dumps(plan, indent=1) + "\n")
    if options.dry_run:
        return
    leftovers = leftover_partials(Path(dst))
    if leftovers and not options.resume:
        warn(
            f"note: {leftovers[-1]} is left from an interrupted conversion to {dst}; "
            "--resume reuses its finished shards"
        )
    with atomic_folder(
        Path(dst), overwrite=options.overwrite, resume=options.resume, sources=[src]
    ) as folder:
        written = execute_megatron_to_hf(
            ckpt,
            steps,
            folder,
            limit,
            check_finite=options.check_finite,
            resume=options.resume,
            workers=options.workers,
        )
        if options.resume:
            log(f"resume: {len(written.reused)} of {len(shards)} shard(s) reused, the rest written")
        config.dtype = _config_dtype(options.dtype, planned)
        family.write_extras(folder, config)
        if reference is not None:
            write_generation_defaults(folder, generation_defaults(family, reference))
        if options.tokenizer is not None:
            for name in TOKENIZER_FILES:  # what the family wrote (e.g. chat_template.jinja) wins
                if (Path(options.tokenizer) / name).exists() and not (folder / name).exists():
                    shutil.copyfile(Path(options.tokenizer) / name, folder / name)
        record = source_record(ckpt, options.dtype)
        card_fields = dict(reference.card, reference_sha256=reference.sha256) if reference else {}
        write_card(folder, family=family, source=record, tool=tool(), digests=written.digests, **card_fields)
        seal(folder, record, written.digests)
    log(f"wrote {dst}")


def _config_dtype(choice: str, planned) -> torch.dtype:
    """config.json's dtype: official is bfloat16 (some tensors float32); source: the dtype most of
    the bytes have (what from_pretrained(dtype="auto") takes)."""
    if choice == "official":
        return torch.bfloat16
    if choice in FIXED_DTYPES:
        return FIXED_DTYPES[choice]
    by_dtype = collections.Counter()
    for target in planned:
        by_dtype[target.dtype] += target.nbytes
    return by_dtype.most_common(1)[0][0]


def convert_hf_to_megatron(
    hf_dir: Path,
    dst: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    fmt: str = "torch",
    divisible_by: int = 128,
    overwrite: bool = False,
    sources=(),
    log: Callable[[str], None] = _stdout,
    warn: Callable[[str], None] = _stderr,
) -> None:
    """A Hugging Face folder -> a Megatron checkpoint (`fmt` torch or torch_dist) at TP x PP, vocab
    and ViT heads re-padded as Megatron pads them. `sources`: more folders DST may not touch."""
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
        warn(f"note: {leftover} is left from an interrupted run to {dst} (not reused)")
    with atomic_folder(dst, overwrite=overwrite, sources=[hf_dir, *sources]) as folder:
        writer = write_legacy if fmt == "torch" else write_torch_dist
        writer(folder, args, steps, source, pipelined_stacks=(family.pipelined_stack,))
    log(f"wrote {dst}: TP={tp} PP={pp} {fmt}")


def reshard(
    src: Path,
    dst: Path,
    *,
    tp: int,
    pp: int = 1,
    fmt: str | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = _stdout,
    warn: Callable[[str], None] = _stderr,
) -> None:
    """A Megatron checkpoint re-sharded to another TP/PP (and format, default the source's),
    through the exact HF layout in a temporary folder beside DST."""
    check_output_location(dst, [src])
    ckpt = open_megatron(src, trust_pickle=trust_pickle)
    divisible_by = getattr(ckpt.args, "make_vocab_size_divisible_by", 128)
    with tempfile.TemporaryDirectory(
        prefix=".reshard-", dir=Path(dst).parent if Path(dst).parent.exists() else None
    ) as tmp:
        middle = Path(tmp) / "hf"
        options = ConvertOptions(no_tokenizer=True, trust_pickle=trust_pickle)
        convert_megatron_to_hf(src, middle, options, log=log, warn=warn)
        try:
            convert_hf_to_megatron(
                middle,
                dst,
                tp=tp,
                pp=pp,
                fmt=fmt or ckpt.format,
                divisible_by=divisible_by,
                overwrite=overwrite,
                sources=[src],
                log=log,
                warn=warn,
            )
        except ConversionError as exc:  # name the user's checkpoint, not the intermediate folder
            reason = str(exc).replace(f"{middle / 'config.json'}: ", "").replace(f"{middle}: ", "")
            raise ConversionError(f"{src}: cannot reshard to TP={tp} PP={pp}: {reason}") from None


def inspect(src: Path, *, trust_pickle: bool = False) -> list[tuple[str, object]]:
    """(label, value) rows: format, parallel layout, iteration, args generation, the args the
    checkpoint's family names (families/base.py INSPECT_FIELDS), tensor count and bytes."""
    from mappings.megatron_args import generation_of

    ckpt = open_megatron(src, trust_pickle=trust_pickle)
    args = ckpt.args
    names = ckpt.names()
    rows: list[tuple[str, object]] = [
        ("path", src),
        ("format", ckpt.format),
        ("iteration", ckpt.iteration_dir.name),
        ("parallel layout", f"TP={ckpt.tp} PP={ckpt.pp} VP={ckpt.vp}"),
        ("args names", generation_of(args)),
    ]
    if getattr(ckpt, "generation", ""):
        rows.append(("common state", ckpt.generation))
    rows += [(key, getattr(args, key)) for key in family_for_args(args).inspect_fields if hasattr(args, key)]
    rows.append(("tensors", len(names)))
    rows.append(("bytes (as stored)", f"{sum(ckpt.nbytes(name) for name in names):,}"))
    return rows
