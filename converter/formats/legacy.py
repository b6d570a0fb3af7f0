"""Megatron-LM's legacy `torch` checkpoint format, read and written rank by rank.

    ROOT/latest_checkpointed_iteration.txt      an iteration number or "release"
    ROOT/iter_0000123/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args", "checkpoint_version", "iteration", "model" (or "model0", "model1", ... with virtual
         pipeline parallelism), optionally "optimizer", "rng_state", ...}

The reader exposes the checkpoint as GLOBAL names (pipeline stages and virtual chunks joined, layer
numbers restored) each with its list of tensor-parallel shards, memory-mapped: nothing is read
until a tensor is used. Optimizer and RNG entries are never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConversionError
from . import mapped_pages, safe_pickle
from .read_ahead import ReadAhead

TRACKER = "latest_checkpointed_iteration.txt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")


def layer_pattern(pipelined_stacks) -> re.Pattern:
    """`^(stack)(N).` for the layer stacks that pipeline stages split (the LLM's; the model family
    names them: a vision tower's layers all live on the first stage and keep their numbers)."""
    stacks = sorted(set(pipelined_stacks), key=len, reverse=True)  # the longest spelling first
    if not stacks:
        raise ValueError("no pipelined layer stack named")
    return re.compile("^(" + "|".join(map(re.escape, stacks)) + r")(\d+)\.")


def iteration_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def find_iteration_dir(root: Path, iteration: int | None = None) -> tuple[Path, str | None]:
    """The iteration folder to read, and a note when it was chosen without a tracker."""
    root = Path(root)
    if iteration is not None:
        path = root / iteration_name(iteration)
        if not path.is_dir():
            raise ConversionError(f"{path}: iteration {iteration} not found")
        return path, None
    tracker = root / TRACKER
    if tracker.exists() or tracker.is_symlink():
        try:
            text = tracker.read_bytes()[:64].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConversionError(
                f"{tracker}: not text (expected an iteration number or 'release')"
            ) from None
        except OSError as exc:
            what = "is a folder" if tracker.is_dir() else exc.strerror
            raise ConversionError(f"{tracker}: unreadable ({what})") from None
        if text != "release" and not text.isdigit():
            raise ConversionError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        path = root / iteration_name(text)
        if not path.is_dir():
            raise ConversionError(f"{tracker}: points to iteration {text}, but {path} does not exist")
        return path, None
    iterations = sorted(p for p in root.glob("iter_*") if p.is_dir())
    if not iterations:
        raise ConversionError(f"{root}: not a Megatron checkpoint (no {TRACKER} and no iter_* folder)")
    note = None
    if len(iterations) > 1:
        note = (
            f"{root}: no {TRACKER}; using the newest of {len(iterations)} iterations, {iterations[-1].name}"
        )
    return iterations[-1], note


@dataclass
class LegacyCheckpoint:
    root: Path
    iteration_dir: Path
    args: object
    tp: int
    pp: int
    vp: int
    shards: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # global name -> per TP rank
    note: str | None = None
    files: list[Path] = field(default_factory=list)  # every rank file
    _stage_files: dict[str, list[Path]] = field(default_factory=dict)  # global name -> per TP rank
    _last_read: list[torch.Tensor] = field(default_factory=list, repr=False)  # shards mapped in last
    _ahead: tuple | None = field(default=None, repr=False)  # (ReadAhead, name -> position) once ordered
    _mapped: mapped_pages.FileMappings | None = field(default=None, repr=False)  # of `files`

    @property
    def mappings(self) -> mapped_pages.FileMappings:
        """Where this checkpoint's rank files are mapped (the shards are views of them)."""
        if self._mapped is None:
            self._mapped = mapped_pages.FileMappings(self.files)
        return self._mapped

    format = "torch"

    def names(self) -> list[str]:
        return list(self.shards)

    def files_of(self, name: str) -> list[Path]:
        return self._stage_files.get(name, [])

    def read(self, name: str, transform) -> torch.Tensor:
        """The global tensor of `name`, merging its TP shards with the row's transform. The pages
        of the previous read's shards are given back first: a reader streaming tensor by tensor
        keeps one tensor's shards resident, not the whole checkpoint (formats/mapped_pages.py)."""
        self.mappings.release(self._last_read)
        shards = self.shards[name]
        if self._ahead is not None and name in self._ahead[1]:
            self._ahead[0].reached(self._ahead[1][name])
        merged = self._merged(name, shards, transform)
        if mapped_pages.overlaps(merged, shards):
            self._last_read = shards  # the result is a view of a shard: given back at the next read
        else:
            self.mappings.release(shards)  # merged into a copy: the shards' pages are done with
            self._last_read = []
        return merged

    def read_order(self, names: list[str]) -> None:
        """The tensors about to be read, in order: their bytes are read ahead into the page cache
        while the current one is being written (formats/read_ahead.py)."""
        items = [[r for r in map(self.mappings.file_range, self.shards[n]) if r is not None] for n in names]
        self._ahead = (ReadAhead(items), {name: k for k, name in enumerate(names)})

    def shape(self, name: str, transform) -> tuple[int, ...]:
        metas = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in self.shards[name]]
        if transform.tp_dim is None:
            return tuple(metas[0].shape)
        return tuple(self._merged(name, metas, transform).shape)

    def _merged(self, name: str, shards: list[torch.Tensor], transform) -> torch.Tensor:
        try:
            return transform.merge(shards)
        except (ValueError, RuntimeError) as exc:  # a transform's layout error, or torch's
            raise ConversionError(f"{self._odd_rank_file(name, shards)}: {name}: {exc}") from None

    def _odd_rank_file(self, name: str, shards: list[torch.Tensor]) -> Path:
        """The first rank file whose shard differs from TP rank 0's (in shape, else in value)."""
        files = self.files_of(name)
        for rank, shard in enumerate(shards[1:], start=1):
            if shard.shape != shards[0].shape:
                return files[rank]
        for rank, shard in enumerate(shards[1:], start=1):
            if shard.device.type != "meta" and not torch.equal(shard, shards[0]):
                return files[rank]
        return files[0]

    def dtype(self, name: str) -> torch.dtype:
        return self.shards[name][0].dtype

    def nbytes(self, name: str) -> int:
        return sum(s.numel() * s.element_size() for s in self.shards[name])


def _rank_files(iteration_dir: Path) -> dict[tuple[int, int], Path]:
    files = {}
    for child in sorted(iteration_dir.iterdir()):
        found = _RANK_DIR.match(child.name)
        if found and child.is_dir():
            files[(int(found.group(1)), int(found.group(2) or 0))] = child / "model_optim_rng.pt"
    return files


# Fields of `args` every rank file of one checkpoint must agree on (its parallel layout and shapes).
LAYOUT_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "padded_vocab_size",
)


MAX_LISTED_MISSING = 64  # more missing ranks than this are counted, not listed


def parallel_sizes(args, path: Path) -> tuple[int, int, int]:
    """TP, PP and layer count from a checkpoint's args, refused unless positive integers."""
    values = []
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers"):
        value = getattr(args, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
            raise ConversionError(f"{path}: args.{name} is {value!r}, not a positive integer")
        values.append(value)
    return tuple(values)


def _load_state(path: Path, trust_pickle: bool) -> dict:
    state = safe_pickle.load(path, trust_pickle=trust_pickle)
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _rank_name(t: int, p: int, pp: int) -> str:
    return f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")


def read(
    root: Path, *, iteration: int | None = None, trust_pickle: bool = False, pipelined_stacks
) -> LegacyCheckpoint:
    """The checkpoint at `root`: every rank file's tensors under global names (TP shards side by
    side; the layers of `pipelined_stacks` renumbered from stage-local to global)."""
    stacked = layer_pattern(pipelined_stacks)
    iteration_dir, note = find_iteration_dir(root, iteration)
    files = _rank_files(iteration_dir)
    if not files:
        raise ConversionError(f"{iteration_dir}: no mp_rank_* folders")
    first_path = files[min(files)]
    first = _load_state(first_path, trust_pickle)
    args = first.get("args")
    if args is None:
        raise ConversionError(f"{first_path}: no 'args' in the checkpoint")
    tp, pp, num_layers = parallel_sizes(args, first_path)
    stages = 1 + max(p for _, p in files)
    if pp == 1 and stages > 1 and all(_RANK_DIR.match(f.parent.name).group(2) for f in files.values()):
        # NVLM-1.0's pp_checkpoint_converter.py re-splits the stages but copies args unchanged; like
        # Megatron-LM's load_checkpoint, trust the rank folders' names for the pipeline layout
        pp = stages
        note = "; ".join(filter(None, [note, f"{iteration_dir}: args say PP=1, the rank folders PP={pp}"]))
    if tp * pp > len(files) + MAX_LISTED_MISSING:  # before anything proportional to TP x PP is built
        raise ConversionError(
            f"{first_path}: args say TP={tp} PP={pp} ({tp * pp:,} ranks) but {iteration_dir} holds "
            f"{len(files)} rank folder(s)"
        )
    expected = {(t, p) for t in range(tp) for p in range(pp)}
    missing = sorted(expected - set(files))
    if missing:
        names = ", ".join(_rank_name(t, p, pp) for t, p in missing)
        raise ConversionError(
            f"{iteration_dir}: args say TP={tp} PP={pp} but these ranks are missing: {names}"
        )
    extra = sorted(set(files) - expected)
    if extra:
        raise ConversionError(
            f"{files[extra[0]].parent}: a rank the args (TP={tp} PP={pp}) do not have: "
            "ranks with different layouts?"
        )
    for path in files.values():
        if not path.exists():
            raise ConversionError(f"{path}: missing")
    ckpt = LegacyCheckpoint(Path(root), iteration_dir, args, tp, pp, 1, note=note)
    ckpt.files = [files[key] for key in sorted(files)]
    layout = {name: getattr(args, name, None) for name in LAYOUT_FIELDS}
    first_chunks = sorted(k for k in first if isinstance(k, str) and re.fullmatch(r"model\d*", k))
    layouts: dict[int, set[str]] = {}
    for (t, p), path in sorted(files.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        state = first if path == first_path else _load_state(path, trust_pickle)
        _check_same_layout(path, state, layout, first_path)
        chunks = sorted(k for k in state if isinstance(k, str) and re.fullmatch(r"model\d*", k))
        if not chunks:
            raise ConversionError(f"{path}: no 'model' entry (not a model checkpoint?)")
        if chunks != first_chunks:
            raise ConversionError(f"{path}: holds model chunks {chunks}, {first_path} holds {first_chunks}")
        ckpt.vp = len(chunks) if chunks != ["model"] else 1
        if num_layers % (pp * ckpt.vp):
            raise ConversionError(f"{path}: {num_layers} layers do not divide into PP={pp} x VP={ckpt.vp}")
        names = set()
        for chunk in chunks:
            if not isinstance(state[chunk], dict):
                raise ConversionError(
                    f"{path}: '{chunk}' is a {type(state[chunk]).__name__}, not a state dict"
                )
            virtual = int(chunk[5:] or 0)
            offset = _layer_offset(args, p, virtual, pp, ckpt.vp)
            for key, tensor in state[chunk].items():
                if not isinstance(tensor, torch.Tensor):
                    continue  # _extra_state None / BytesIO stand-ins
                if not isinstance(key, str):
                    raise ConversionError(f"{path}: a tensor under the key {key!r}, not a name")
                name = stacked.sub(lambda m, o=offset: f"{m.group(1)}{int(m.group(2)) + o}.", key)
                names.add(name)
                ckpt.shards.setdefault(name, [None] * tp)[t] = tensor
                ckpt._stage_files.setdefault(name, [None] * tp)[t] = path
        layouts.setdefault(p, set())
        if t == 0:
            layouts[p] = names
        elif names != layouts[p]:
            diff = sorted(names ^ layouts[p])[:5]
            raise ConversionError(f"{path}: holds different tensors than TP rank 0 of its stage: {diff}")
    return ckpt


def _check_same_layout(path: Path, state: dict, layout: dict, first_path: Path) -> None:
    args = state.get("args")
    if args is None:
        raise ConversionError(f"{path}: no 'args' in the checkpoint")
    for name, value in layout.items():
        if getattr(args, name, None) != value:
            raise ConversionError(
                f"{path}: args.{name} is {getattr(args, name, None)!r} but {value!r} in {first_path} "
                "(ranks with different layouts)"
            )


def _layer_offset(args, pp_rank: int, virtual: int, pp: int, vp: int) -> int:
    per_chunk = args.num_layers // (pp * vp)
    return (virtual * pp + pp_rank) * per_chunk


def rank_dir(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return Path(root) / iteration_name(iteration) / name


def rank_contents(args, iteration: int, model: dict) -> dict:
    """What a Megatron-LM rank file holds (model only: no optimizer, no RNG state)."""
    return {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model}


def rank_file(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> Path:
    """The rank's model_optim_rng.pt path, its folder created."""
    path = rank_dir(root, iteration, tp_rank, pp_rank, pp)
    path.mkdir(parents=True, exist_ok=True)
    return path / "model_optim_rng.pt"


def write_tracker(root: Path, iteration: int) -> None:
    (Path(root) / TRACKER).write_text(str(iteration))


def local_layer_name(name: str, pp_rank: int, layers_per_stage: int, pipelined_stacks) -> str:
    """Global LLM layer number -> the stage-local one a legacy file stores."""
    return layer_pattern(pipelined_stacks).sub(
        lambda m: f"{m.group(1)}{int(m.group(2)) - pp_rank * layers_per_stage}.", name
    )


def stage_of(name: str, pp: int, layers_per_stage: int, num_layers: int, pipelined_stacks) -> int:
    """Pipeline stage a global tensor lives on: LLM layer i on i // per-stage; embeddings, vision
    and projector on the first; final norm and output layer on the last."""
    found = layer_pattern(pipelined_stacks).match(name)
    if found:
        return int(found.group(2)) // layers_per_stage
    if name.endswith(("final_layernorm.weight", "output_layer.weight")):
        return pp - 1
    return 0
