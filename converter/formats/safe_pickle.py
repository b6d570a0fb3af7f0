"""Loading Megatron pickles without executing code from them.

Megatron files are torch pickles whose `args` reference a few non-tensor globals. They are loaded
with `weights_only=True` plus an explicit allow-list: argparse.Namespace, and stand-ins for the
Megatron/Transformer Engine classes real checkpoints hold (enums in `args`, BytesIO extra state),
so megatron-core need not be installed and no constructor from the file runs. Anything else is
refused with the file and the global named, unless the user typed `--trust-pickle`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from ..errors import ConversionError


class StandIn:
    """Inert placeholder for an allowed non-tensor global (keeps what it was given, runs nothing)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"StandIn{self.args}"


# Globals real Megatron-LM / Megatron-Core checkpoints reference besides tensors and dtypes.
STAND_IN_GLOBALS = (
    "_io.BytesIO",  # Transformer Engine extra state
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.core.dist_checkpointing.mapping.ShardedObject",
)


def allowed_globals() -> list:
    return [argparse.Namespace, *((StandIn, name) for name in STAND_IN_GLOBALS)]


# torch's two spellings of a refused global (an unknown class, or one from a blocked module)
_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def load(path: Path, *, trust_pickle: bool = False, mmap: bool = True) -> dict:
    """torch.load of a Megatron file: tensors memory-mapped, no code from the file executed."""
    path = Path(path)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for refused / truncated files
        found = _UNSUPPORTED.search(str(exc))
        if found:
            raise ConversionError(
                f"{path}: refusing to unpickle the global {found.group(1)} (not on the allow-list of a "
                "Megatron checkpoint); pass --trust-pickle only if you trust where the file came from"
            ) from None
        raise ConversionError(
            f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from None
