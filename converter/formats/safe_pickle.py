"""Loading the pickles a checkpoint holds without executing code from them.

Every pickle of a Megatron checkpoint goes through here: legacy rank files and `common.pt`
(`load`), DCP byte objects such as megatron-core 0.19's `common_state` (`load` of the bytes), and
DCP's own `.metadata` (`load_dcp_metadata`).

torch files are read with torch's `weights_only` unpickler plus inert stand-ins for the non-tensor
globals that Megatron-LM of every generation pickles: any `megatron.*` / `transformer_engine.*`
enum or class (also ones the installed megatron-core no longer has, e.g. NVLM-1.0's
`ModelType.encoder_and_decoder`), numpy's RNG state (`numpy._core` and `numpy.core` spellings),
`signal.Signals` and `_io.BytesIO`. A stand-in keeps what the pickle gave it and runs nothing, so
megatron-core need not be installed. The globals are listed by disassembling the pickle before
anything is built (torch.serialization.get_unsafe_globals_in_checkpoint); anything else (e.g.
`os.system`) is refused with the file and the global named, unless the user typed `--trust-pickle`.

DCP `.metadata` is a plain pickle (torch itself reads it with `pickle.load`); its unpickler admits
only torch's DCP metadata classes and the few torch values they hold.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import pickle
import re
import types
from pathlib import Path

import torch

from ..errors import ConversionError


class StandIn:
    """Inert placeholder for an admitted non-tensor global (keeps what it was given, runs nothing).
    `global_name` says which global it stands for; `args` are what the pickle called it with, so an
    enum member keeps its value (e.g. ModelType(2) -> StandIn with args (2,))."""

    global_name = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"{self.global_name}{self.args}"

    @property
    def value(self):
        """The enum value a Megatron enum member was pickled with (None for other objects)."""
        return self.args[0] if len(self.args) == 1 else None


# Globals admitted as stand-ins: whole namespaces (any enum or class of Megatron-LM / Megatron-Core
# / Transformer Engine of any version) and exact names of the standard library and numpy.
STAND_IN_PREFIXES = ("megatron.", "transformer_engine.")
STAND_IN_NAMES = frozenset(
    {
        "_io.BytesIO",  # Transformer Engine extra state
        "signal.Signals",  # args.exit_signal (megatron-core 0.19)
        # numpy RNG state in rng_state (numpy 2 and numpy 1 spellings)
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
    }
)
_NUMPY_DTYPE_CLASS = re.compile(r"^numpy\.dtypes\.\w+DType$")  # numpy 2 pickles dtypes by class


def is_inert(name: str) -> bool:
    """Whether the global `name` is one a Megatron checkpoint holds and a stand-in can replace."""
    return (
        name.startswith(STAND_IN_PREFIXES) or name in STAND_IN_NAMES or bool(_NUMPY_DTYPE_CLASS.match(name))
    )


_stand_ins: dict[str, type] = {}


def stand_in_for(name: str) -> type:
    """One StandIn subclass per global name (so a repr says what the object was)."""
    if name not in _stand_ins:
        _stand_ins[name] = type(f"StandIn[{name}]", (StandIn,), {"global_name": name})
    return _stand_ins[name]


def _refused(where: str, name: str) -> ConversionError:
    return ConversionError(
        f"{where}: refusing to unpickle the global {name} (not on the allow-list of a Megatron "
        "checkpoint); pass --trust-pickle only if you trust where the file came from"
    )


# Real classes admitted as they are: constructing them from a pickle runs nothing else.
HARMLESS = {
    "argparse.Namespace": argparse.Namespace,
    "types.SimpleNamespace": types.SimpleNamespace,
    "pathlib.PosixPath": pathlib.PosixPath,
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
}


@contextlib.contextmanager
def _only_our_safe_globals():
    """The loader's own allow-list, whatever the process registered with torch: megatron-core
    registers its real enums (`register_safe_globals`), and its ModelType of today cannot hold
    NVLM-1.0's value 2; which of two entries under one name wins is torch's set order."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


# torch's two spellings of a refused global (an unknown class, or one from a blocked module)
_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def load(source: Path | bytes, *, trust_pickle: bool = False, mmap: bool = True, where: str | None = None):
    """torch.load of a Megatron file (a path; tensors memory-mapped) or of a byte object read from a
    DCP file (`where` names it in messages): no code from the pickle executed."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = where or "<bytes>"
        opened, mmap = (lambda: io.BytesIO(source)), False
    else:
        source = Path(source)
        where = where or str(source)
        opened = lambda: source  # noqa: E731
    try:
        if trust_pickle:
            return torch.load(opened(), map_location="cpu", weights_only=False, mmap=mmap)
        with _only_our_safe_globals():
            names = torch.serialization.get_unsafe_globals_in_checkpoint(opened())
            for name in sorted(names):
                if not is_inert(name) and name not in HARMLESS:
                    raise _refused(where, name)
            admitted = [*HARMLESS.values(), *((stand_in_for(name), name) for name in names if is_inert(name))]
            torch.serialization.add_safe_globals(admitted)
            return torch.load(opened(), map_location="cpu", weights_only=True, mmap=mmap)
    except ConversionError:
        raise
    except Exception as exc:  # torch raises several types for refused / truncated files
        found = _UNSUPPORTED.search(str(exc))
        if found:
            raise _refused(where, found.group(1)) from None
        raise ConversionError(
            f"{where}: cannot be read as a torch checkpoint ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]})"
        ) from None


def bytes_of(value) -> bytes | None:
    """The bytes of a pickled io.BytesIO (a stand-in: state = (bytes, position, dict)); None for
    anything else. torch's DCP writes a BytesIO value as torch.save of the BytesIO itself."""
    if isinstance(value, io.BytesIO):  # loaded with --trust-pickle
        return value.getvalue()
    if isinstance(value, StandIn) and value.global_name == "_io.BytesIO":
        state = getattr(value, "state", None)
        if isinstance(state, tuple) and state and isinstance(state[0], (bytes, bytearray)):
            return bytes(state[0])
        if value.args and isinstance(value.args[0], (bytes, bytearray)):
            return bytes(value.args[0])
    return None


# --- DCP .metadata -----------------------------------------------------------------------------

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    ),
    # what megatron-core keeps of the save plans (Metadata.planner_data)
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),  # a layout by its name, e.g. "torch.strided"
    "torch.distributed.checkpoint._extension": ("StreamTransformExtension",),
}


_PATH_CLASSES = ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")


def _dcp_value(module: str, name: str):
    """The object a `.metadata` pickle may name, or None."""
    if name in _DCP_CLASSES.get(module, ()):
        return getattr(__import__(module, fromlist=[name]), name)
    if module == "torch":
        value = getattr(torch, name, None)
        if name == "Size" or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
    if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:  # StorageMeta.checkpoint_id
        import pathlib

        return getattr(pathlib, name)
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    return None


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self._where = where

    def find_class(self, module, name):
        value = _dcp_value(module, name)
        if value is None:
            raise _refused(self._where, f"{module}.{name}")
        return value


def load_dcp_metadata(path: Path, *, trust_pickle: bool = False):
    """A DCP `.metadata` file, admitting only torch's DCP metadata classes (torch's own
    FileSystemReader.read_metadata unpickles it with plain pickle.load, which runs any code)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            if trust_pickle:
                return pickle.load(file)
            return _DCPMetadataUnpickler(file, str(path)).load()
    except ConversionError:
        raise
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ConversionError(f"{path}: unreadable ({type(exc).__name__}: {reason})") from None
