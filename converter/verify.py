"""`convert-checkpoint verify HF_DIR [--against MEGATRON_DIR]`: is a Hugging Face folder intact?

Four checks, every problem collected rather than the first one raised:
1. the index against the files: every indexed tensor is in the shard the index names, no shard
   holds a tensor the index does not list, every header is consistent with its file;
2. the manifest: every file it lists has its size and sha256 (and no weight file is unlisted);
3. config.json: the model class built from it on the meta device (as a conversion does) expects
   exactly these names and shapes, and the dtypes agree with the config's `dtype`;
4. with a Megatron source: through the mapping table, every tensor is bitwise the source's,
   cast to the stored dtype (one tensor in memory at a time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mappings.transforms import LayoutError

from .errors import ConversionError
from .formats.checksums import digest_of
from .formats.safetensors_stream import DTYPE_NAMES, DTYPE_OF_NAME, INDEX, read_header
from .manifest import MANIFEST, read_manifest
from .tokenizer_folder import TokenizerInfo, tokenizer_size


@dataclass
class StoredTensor:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Report:
    folder: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    def problem(self, what: str, names=None, limit: int = 8) -> None:
        if names is None:
            self.problems.append(what)
        elif names:
            names = sorted(names)
            more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
            self.problems.append(f"{what}: {', '.join(names[:limit])}{more}")


def _load_config(folder: Path):
    from .families import family_for_hf_config

    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder")
    path = folder / "config.json"
    try:
        config_json = json.loads(path.read_text())
        family = family_for_hf_config(config_json)
        return config_json, family, family.config_class()(**config_json)
    except FileNotFoundError:
        raise ConversionError(f"{folder}: no config.json (not a Hugging Face folder)") from None
    except Exception as exc:  # JSON, or a config class refusing the fields
        raise ConversionError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def _stored_tensors(folder: Path, report: Report) -> dict[str, StoredTensor]:
    """Check the index against the shard headers; return what the files hold."""
    index_path = folder / INDEX
    weight_map = None
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError("weight_map is not a table of file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.problem(f"{INDEX}: unreadable ({exc})")
            weight_map = None
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    unlisted = {p.name for p in folder.glob("*.safetensors")} - set(files)
    report.problem(f"weight files the {INDEX if weight_map else 'folder layout'} does not list", unlisted)
    stored: dict[str, StoredTensor] = {}
    for file in files:
        path = folder / file
        if "/" in file or file.startswith(".") or not path.is_file():
            report.problem(f"{file}: missing (the index names it)")
            continue
        try:
            header = read_header(path)
        except (OSError, ValueError) as exc:
            report.problem(f"{file}: not a valid safetensors file ({exc})")
            continue
        for name, entry in header.items():
            if name in stored:
                report.problem(f"{name}: in both {stored[name].file} and {file}")
            stored[name] = StoredTensor(file, DTYPE_OF_NAME[entry["dtype"]], tuple(entry["shape"]))
    if weight_map:
        absent = [n for n, f in weight_map.items() if n not in stored or stored[n].file != f]
        report.problem("tensors the index lists but the file it names does not hold", absent)
        report.problem("tensors in the files that the index does not list", set(stored) - set(weight_map))
        total = (
            index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        )
        data = sum(_nbytes(t) for t in stored.values())
        if total is not None and total != data:
            report.problem(f"{INDEX}: metadata.total_size is {total}, the files hold {data} bytes of tensors")
    report.checked.append(f"{len(stored)} tensors in {len(files)} file(s) agree with the index")
    return stored


def _nbytes(tensor: StoredTensor) -> int:
    count = 1
    for size in tensor.shape:
        count *= size
    return count * torch.empty((), dtype=tensor.dtype).element_size()


def _check_manifest(folder: Path, report: Report) -> None:
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:
        report.problem(str(exc))
        return
    if manifest is None:
        report.notes.append(f"{folder}: no {MANIFEST}, file checksums not checked")
        return
    listed = manifest["files"]
    for name, entry in sorted(listed.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            report.problem(f"{MANIFEST}: lists a path outside the folder: {name}")
        elif not path.is_file():
            report.problem(f"{name}: missing (the manifest lists it)")
        elif path.stat().st_size != entry["size"]:
            report.problem(f"{name}: {path.stat().st_size:,} bytes, the manifest says {entry['size']:,}")
        elif digest_of(path).sha256 != entry["sha256"]:
            report.problem(f"{name}: sha256 differs from the manifest (changed since the conversion)")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    unlisted = present - set(listed)
    weights = {n for n in unlisted if n.endswith(".safetensors") or n == INDEX}
    report.problem(f"weight files the {MANIFEST} does not list", weights)
    if unlisted - weights:
        report.notes.append(f"files added after the conversion: {', '.join(sorted(unlisted - weights))}")
    report.checked.append(f"{len(listed)} files match the manifest's sha256")


def _config_dtype(config_json: dict) -> torch.dtype | None:
    """config.json's dtype (None when it names none, as after `--dtype source`)."""
    text = config_json.get("dtype") or config_json.get("torch_dtype")
    dtype = getattr(torch, str(text), None) if text else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _allowed_dtypes(dtype: torch.dtype, family, name: str) -> set[torch.dtype]:
    # --dtype official: bfloat16, but the release keeps some tensors (attention projections) in float32
    return {dtype, family.official_dtype(name)} if dtype == torch.bfloat16 else {dtype}


def _check_config(config_json, family, config, stored: dict[str, StoredTensor], report: Report) -> None:
    expected = family.expected(config)
    report.problem("tensors config.json's model has but the files lack", set(expected) - set(stored))
    report.problem(
        "tensors the files hold but config.json's model does not have", set(stored) - set(expected)
    )
    config_dtype = _config_dtype(config_json)
    for name in sorted(set(expected) & set(stored)):
        if stored[name].shape != expected[name]:
            report.problem(
                f"{name}: shape {stored[name].shape} in {stored[name].file}, config.json's model "
                f"expects {expected[name]}"
            )
        allowed = _allowed_dtypes(config_dtype, family, name) if config_dtype else None
        if allowed is not None and stored[name].dtype not in allowed:
            names = " or ".join(sorted(str(d).removeprefix("torch.") for d in allowed))
            report.problem(
                f"{name}: {DTYPE_NAMES[stored[name].dtype]} in {stored[name].file}, config.json says {names}"
            )
    dtypes = {t.dtype for t in stored.values()}
    if config_dtype is None and len(dtypes) > 1:
        counts = {DTYPE_NAMES[d]: sum(t.dtype == d for t in stored.values()) for d in dtypes}
        report.problem(
            f"mixed dtypes {counts} and no dtype in config.json (a source-dtype conversion has one)"
        )
    report.checked.append(f"names, shapes and dtypes agree with config.json ({len(expected)} tensors)")


def _check_against(folder: Path, stored: dict[str, StoredTensor], source: Path, trust_pickle: bool, report):
    from safetensors import safe_open

    from .engine import plan_megatron_to_hf
    from .families import PIPELINED_STACKS, family_for_args
    from .formats.reader import open_checkpoint

    ckpt = open_checkpoint(source, trust_pickle=trust_pickle, pipelined_stacks=PIPELINED_STACKS)
    family = family_for_args(ckpt.args)
    try:
        # what the checkpoint cannot tell (tokenizer size, real ViT heads) is taken from the folder
        folder_config = json.loads((folder / "config.json").read_text())
        source_config = family.hf_config(
            ckpt.args,
            ckpt=ckpt,
            tokenizer=TokenizerInfo(size=tokenizer_size(folder)),
            vision_real_heads=folder_config.get("vision_config", {}).get("num_attention_heads"),
        )
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise ConversionError(f"{ckpt.iteration_dir}: args do not describe a model ({exc})") from None
    table = family.table(source_config, getattr(ckpt.args, "make_vocab_size_divisible_by", 128))
    steps = plan_megatron_to_hf(
        ckpt,
        table,
        family.expected(source_config),
        lambda name, dtype: stored[name].dtype if name in stored else dtype,
    )
    targets = {t.name for s in steps for t in s.targets}
    report.problem(f"tensors {source} has but the folder lacks", targets - set(stored))
    report.problem(f"tensors the folder has but {source} does not", set(stored) - targets)
    handles, unreadable, different, compared = {}, set(), [], 0
    for step in steps:
        wanted = [t for t in step.targets if t.name in stored and stored[t.name].file not in unreadable]
        if not wanted:
            continue
        try:
            whole = ckpt.read(step.source, step.rule.transform)
            parts = dict(zip((t.name for t in step.targets), step.rule.transform.to_hf(whole)))
        except LayoutError as exc:
            raise ConversionError(f"{source}: {step.source}: {exc}") from None
        for target in wanted:
            file = stored[target.name].file
            try:
                if file not in handles:
                    handles[file] = safe_open(str(folder / file), framework="pt")
                mine = handles[file].get_tensor(target.name)
            except Exception as exc:  # safetensors raises its own error types
                unreadable.add(file)
                report.problem(f"{file}: safetensors cannot read it ({type(exc).__name__}: {exc})")
                continue
            compared += 1
            theirs = parts[target.name].to(mine.dtype)
            if not _bitwise_equal(mine, theirs):
                different.append(target.name)
    report.problem(f"tensors that differ from {source}", different)
    report.checked.append(f"{compared} tensors bitwise equal to {source} through the mapping table")


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def verify_folder(folder: Path, against: Path | None = None, trust_pickle: bool = False) -> Report:
    """All checks on `folder`; ConversionError when it (or `against`) cannot be read at all."""
    folder = Path(folder)
    config_json, family, config = _load_config(folder)
    report = Report(folder)
    stored = _stored_tensors(folder, report)
    _check_manifest(folder, report)
    _check_config(config_json, family, config, stored, report)
    if against is not None:
        _check_against(folder, stored, Path(against), trust_pickle, report)
    return report
