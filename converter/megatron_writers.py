"""Hugging Face -> Megatron: the tensors of an HF folder written as a legacy or torch_dist checkpoint.

Both writers lay every file out from shapes first (meta tensors through the same transforms) and
then make each global Megatron tensor once, from its HF tensors, and write its pieces where they
go. Memory holds one global tensor and its pieces, whatever the depth of the model:
- legacy: each rank file is a torch.save archive laid out ahead and filled tensor by tensor
  (formats/torch_zip.py); a tensor's TP pieces go to the TP rank files of its stage;
- torch_dist: chunks per layer and per TP rank, as Megatron-Core saves them, handed to DCP's
  writer one at a time (formats/torch_dist_writer.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from mappings.table import Rule, Table
from mappings.transforms import LayoutError

from .errors import ConversionError
from .families import PIPELINED_STACKS
from .formats import legacy, mapped_pages, torch_dist_writer
from .formats.safetensors_stream import DTYPE_NAMES
from .formats.torch_zip import StreamedTorchSave

_DTYPE_OF_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class HFSource:
    """A Hugging Face folder's tensors, memory-mapped through safetensors; shapes without reading."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.folder}: no .safetensors files")
        self._handles = {}
        self.where = {}
        self._fetched: dict[str, torch.Tensor] = {}
        self._mappings = mapped_pages.FileMappings(files)
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise ConversionError(f"{file}: not a readable safetensors file ({exc})") from None
            self._handles[file.name] = handle
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key in self.where:
                    raise ConversionError(
                        f"{file}: {key} is also in {self.folder / self.where[key]} (one tensor in two "
                        "shard files: which one is meant is not clear)"
                    )
                self.where[key] = file.name
                try:
                    dtype = handle.get_slice(key).get_dtype()
                except Exception as exc:
                    raise ConversionError(f"{file}: {key}: unreadable header entry ({exc})") from None
                if dtype not in _DTYPE_OF_NAME:
                    raise ConversionError(
                        f"{file}: {key} has the dtype {dtype}, which the converter does not handle "
                        f"(known: {', '.join(sorted(_DTYPE_OF_NAME))})"
                    )

    def get(self, name: str) -> torch.Tensor:
        tensor = self._handles[self.where[name]].get_tensor(name)  # a view of the file's mapping
        self._fetched[name] = tensor
        return tensor

    def release(self, names: list[str], still_used: torch.Tensor | None = None) -> None:
        """Give back the resident pages of tensors that have been used (see formats/mapped_pages.py):
        otherwise every page read stays resident until the folder is closed. Tensors that
        `still_used` is a view of are kept for a later call."""
        tensors = [self._fetched.get(name) for name in names]
        if still_used is not None and mapped_pages.overlaps(still_used, tensors):
            return
        self._mappings.release([self._fetched.pop(name, None) for name in names])

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype of `name` (from the file header only)."""
        view = self._handles[self.where[name]].get_slice(name)
        return torch.empty(view.get_shape(), dtype=_DTYPE_OF_NAME[view.get_dtype()], device="meta")


_LAYER = re.compile(r"^(.*?\.layers)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layers")


def check_layer_counts(source: HFSource, config_json: dict, config_path: Path) -> None:
    """config.json's layer counts are checked against the layers the tensors hold before any
    model-sized structure is built from them (a claim of 2**40 layers is refused at once)."""
    present: dict[str, set[int]] = {}
    for name in source.where:
        found = _LAYER.match(name)
        if found:
            present.setdefault(found.group(1), set()).add(int(found.group(2)))
    most = max((len(layers) for layers in present.values()), default=0)

    def claims(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                if key in LAYER_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
                    yield where, value
                else:
                    yield from claims(value, where)

    for where, value in claims(config_json):
        if value > most:
            raise ConversionError(
                f"{config_path}: {where} is {value:,}, but the tensors in {source.folder} hold at most "
                f"{most} layers of a stack"
            )


def check_against_config(source: HFSource, expected: dict[str, tuple[int, ...]], config_path: Path) -> None:
    """Every HF tensor the model needs has the shape config.json implies (and config.json implies
    only positive sizes): a contradicting tensor is refused, not written."""
    bad = sorted(name for name, shape in expected.items() if any(d < 1 for d in shape))
    if bad:
        raise ConversionError(
            f"{config_path}: gives {bad[0]} the shape {tuple(expected[bad[0]])} (a size that is zero or "
            f"negative; {len(bad)} tensor(s) so)"
        )
    wrong = [
        (name, tuple(source.meta(name).shape), tuple(shape))
        for name, shape in expected.items()
        if tuple(source.meta(name).shape) != tuple(shape)
    ]
    if wrong:
        name, found, want = wrong[0]
        more = f" ({len(wrong) - 1} more tensors disagree)" if len(wrong) > 1 else ""
        raise ConversionError(
            f"{source.folder / source.where[name]}: {name} has the shape {found}, config.json implies "
            f"{want}{more}"
        )


def check_layout(steps, source: HFSource, tp: int, config_path: Path) -> None:
    """Every global Megatron tensor can be split into TP pieces (meta tensors: no data read), so a
    TP that does not divide a size is refused before anything is written."""
    for rule, layer in steps:
        try:
            rule.transform.split(megatron_tensor(source.meta, rule, layer, tp), tp)
        except (LayoutError, ValueError, RuntimeError) as exc:
            raise ConversionError(
                f"{config_path}: the model cannot be split at TP={tp}: {rule.megatron_name(layer)}: {exc}"
            ) from None
        except ConversionError as exc:
            raise ConversionError(f"{config_path}: the model cannot be laid out at TP={tp}: {exc}") from None


def hf_steps(table: Table, hf_names: list[str]) -> list[tuple[Rule, str]]:
    """(row, layer) pairs that together consume every HF tensor exactly once."""
    pending, steps = set(hf_names), []
    for name in hf_names:
        for rule in table.rules:
            layer = rule.match_hf(name)
            if layer is not None:
                steps.append((rule, layer))
                break
    for rule, layer in steps:
        for target in rule.hf_names(layer):
            if target not in pending:
                raise ConversionError(f"HF tensor {target} is missing or used twice")
            pending.discard(target)
    if pending:
        raise ConversionError(f"HF tensors no mapping row knows: {_listing(pending)}")
    return steps


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def megatron_tensor(get, rule: Rule, layer: str, tp: int) -> torch.Tensor:
    """The global Megatron tensor (target TP padding) of one row, from `get(hf_name)` tensors;
    with `get` giving meta tensors, its shape and dtype."""
    parts = [get(name) for name in rule.hf_names(layer)]
    try:
        return rule.transform.from_hf(parts, tp)
    except LayoutError as exc:
        raise ConversionError(f"{rule.hf_names(layer)[0]}: {exc}") from None


def write_legacy(
    folder: Path, args, steps, source, *, iteration: int = 1, pipelined_stacks=PIPELINED_STACKS
) -> None:
    """Rank files of every stage laid out from shapes, then filled one global tensor at a time.
    `pipelined_stacks`: the layer stacks split across stages (the family's; default: any family's)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    per_stage = args.num_layers // pp
    if args.num_layers % pp:
        raise ConversionError(f"{args.num_layers} layers do not divide into PP={pp} stages")
    stages: dict[int, list] = {}
    for rule, layer in steps:
        name = rule.megatron_name(layer)
        stages.setdefault(legacy.stage_of(name, pp, per_stage, args.num_layers, pipelined_stacks), []).append(
            (rule, layer)
        )
    total = sum(_nbytes(megatron_tensor(source.meta, rule, layer, tp)) for rule, layer in steps)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="megatron rank files", leave=False, disable=None)
    with bar:
        for p in range(pp):
            members = stages.get(p, [])
            files = _lay_out_stage(folder, args, iteration, p, members, source, per_stage, pipelined_stacks)
            try:
                for index, (rule, layer) in enumerate(members):
                    whole = megatron_tensor(source.get, rule, layer, tp)
                    _release(source, rule, layer, still_used=whole)  # done with them unless viewed
                    size = _nbytes(whole)
                    pieces = rule.transform.split(whole, tp)
                    del whole
                    for t in range(tp):
                        files[t].write(index, pieces[t])
                        pieces[t] = None  # freed once written (split copies them)
                    _release(source, rule, layer)
                    bar.update(size)
                for file in files:
                    file.finish()
            finally:
                for file in files:
                    file.close()
    legacy.write_tracker(folder, iteration)


def _lay_out_stage(
    folder, args, iteration, p, members, source, per_stage, pipelined_stacks
) -> list[StreamedTorchSave]:
    """One torch.save skeleton per TP rank of stage `p` (untouched placeholders: no memory)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    names = [
        legacy.local_layer_name(rule.megatron_name(layer), p, per_stage, pipelined_stacks)
        for rule, layer in members
    ]
    metas = [
        rule.transform.split(megatron_tensor(source.meta, rule, layer, tp), tp) for rule, layer in members
    ]
    files = []
    try:
        for t in range(tp):
            model = {
                name: torch.empty(pieces[t].shape, dtype=pieces[t].dtype)
                for name, pieces in zip(names, metas)
            }
            path = legacy.rank_file(folder, iteration, t, p, pp)
            files.append(StreamedTorchSave(path, legacy.rank_contents(args, iteration, model)))
    except BaseException:
        for file in files:
            file.close()
        raise
    return files


def _release(source, rule: Rule, layer: str, still_used: torch.Tensor | None = None) -> None:
    """Tell a source that a row's HF tensors are used (a memory-mapped one gives their pages back,
    unless `still_used` is a view of them)."""
    if hasattr(source, "release"):
        source.release(rule.hf_names(layer), still_used)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


_STACK = re.compile(r"^((?:\w+\.)*?decoder\.layers)\.(\d+)\.(.*)$")
_EXTRA_STATE_OWNERS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def write_torch_dist(folder: Path, args, steps, source, *, iteration: int = 1, pipelined_stacks=None) -> None:
    """What Megatron-Core's dist_checkpointing.save writes, from a single process: global tensors
    under the sharded state dict's names (input norms fused into the next linear's name), the
    layers of each parameter stacked on a leading axis and stored in one chunk per layer and TP
    rank, and an empty `_extra_state` object per linear layer (Megatron-Core's loader expects
    them). One global layer tensor in memory at a time. (Layers keep their global numbers here:
    `pipelined_stacks` is accepted for a writer signature common with write_legacy.)"""
    tp = args.tensor_model_parallel_size
    groups: dict[str, list] = {}
    for rule, layer in steps:
        name = rule.sharded_name(layer)
        found = _STACK.match(name)
        key = f"{found.group(1)}.{found.group(3)}" if found else name
        groups.setdefault(key, []).append((int(found.group(2)) if found else None, rule, layer))
    tensors, members_of, stacked_keys, objects = [], {}, set(), {}
    for key, members in groups.items():
        members.sort(key=lambda m: -1 if m[0] is None else m[0])
        members_of[key] = [(rule, layer) for _, rule, layer in members]
        stacked = members[0][0] is not None
        rule = members[0][1]
        meta = megatron_tensor(source.meta, rule, members[0][2], tp)
        pieces, dim = rule.transform.dist_pieces(tp), rule.transform.tp_dim
        if stacked:
            stacked_keys.add(key)
            shape = (len(members), *meta.shape)
            boxes = [
                box
                for s in range(len(members))
                for box in torch_dist_writer.even_chunks(tuple(meta.shape), dim, pieces, lead=s)
            ]
        else:
            shape = tuple(meta.shape)
            boxes = torch_dist_writer.even_chunks(shape, dim, pieces)
        tensors.append(torch_dist_writer.ChunkedTensor(key, shape, meta.dtype, tuple(boxes)))
        if key.endswith(_EXTRA_STATE_OWNERS) and "output_layer" not in key:
            owner = key.rsplit(".", 1)[0]
            count = len(members) if stacked else 1
            for index in range(count):
                # DCP pickles non-tensor values: this stores torch.save([None]), the bytes Megatron-Core
                # writes for a ShardedObject holding the local spec's None extra state.
                objects[f"{owner}._extra_state/shard_{index}_{count}"] = [None]
    path = Path(folder) / legacy.iteration_name(iteration)
    path.mkdir(parents=True, exist_ok=True)
    total = sum(_nbytes(torch.empty(t.shape, dtype=t.dtype, device="meta")) for t in tensors)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="torch_dist chunks", leave=False, disable=None)
    with bar:
        latest = _LatestTensor(source, members_of, tp)

        def chunk_data(tensor: torch_dist_writer.ChunkedTensor, box) -> torch.Tensor:
            offsets, sizes = box
            stacked = tensor.key in stacked_keys
            if stacked:
                whole, offsets, sizes = latest.get(tensor.key, offsets[0]), offsets[1:], sizes[1:]
            else:
                whole = latest.get(tensor.key, 0)
            for dim, (start, length) in enumerate(zip(offsets, sizes)):
                whole = whole.narrow(dim, start, length)
            bar.update(_nbytes(whole))
            return whole.unsqueeze(0) if stacked else whole

        torch_dist_writer.save(path, tensors, objects, chunk_data)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration}, path / "common.pt")
    metadata = {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    (path / "metadata.json").write_text(json.dumps(metadata))
    legacy.write_tracker(folder, iteration)


class _LatestTensor:
    """The global tensor of (key, layer index) the chunks are being cut from: made when first asked
    for, dropped when another is (DCP asks for chunks tensor by tensor, in plan order)."""

    def __init__(self, source, members_of: dict[str, list], tp: int):
        self._source, self._members_of, self._tp = source, members_of, tp
        self._which, self._tensor = None, None

    def get(self, key: str, index: int) -> torch.Tensor:
        if self._which != (key, index):
            self._tensor = None
            if self._which is not None:
                previous = self._members_of[self._which[0]][self._which[1]]
                _release(self._source, *previous)
            rule, layer = self._members_of[key][index]
            self._tensor = megatron_tensor(self._source.get, rule, layer, self._tp)
            _release(self._source, rule, layer, still_used=self._tensor)
            self._which = (key, index)
        return self._tensor
