"""A mapping table: rows of `megatron pattern -> hf pattern(s), transform`.

Patterns may hold one `{i}`, a layer number (global: pipeline stages are already joined by the
reader). A row may give several Megatron spellings of the same tensor: Megatron-Core's local
layers and Transformer Engine's fused ones name the input norms differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .transforms import Transform


@dataclass(frozen=True)
class Rule:
    # Alternative spellings: the first is Megatron-Core's local-spec state dict (legacy files we
    # write), the last the one its sharded state dict uses (torch_dist files we write).
    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    transform: Transform

    def match(self, name: str) -> str | None:
        """The layer number (or "" for a non-layer row) if `name` is one of this row's tensors."""
        for pattern in self.megatron:
            found = _compiled(pattern).fullmatch(name)
            if found:
                return found.group("i") if "{i}" in pattern else ""
        return None

    def hf_names(self, layer: str) -> list[str]:
        return [name.format(i=layer) for name in self.hf]

    def megatron_name(self, layer: str) -> str:
        return self.megatron[0].format(i=layer)

    def sharded_name(self, layer: str) -> str:
        return self.megatron[-1].format(i=layer)

    def match_hf(self, name: str) -> str | None:
        found = _compiled(self.hf[0]).fullmatch(name)
        if not found:
            return None
        return found.group("i") if "{i}" in self.hf[0] else ""


def row(megatron: str | tuple[str, ...], hf: str | tuple[str, ...], transform: Transform) -> Rule:
    megatron = (megatron,) if isinstance(megatron, str) else tuple(megatron)
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    return Rule(megatron, hf, transform)


_CACHE: dict[str, re.Pattern] = {}


def _compiled(pattern: str) -> re.Pattern:
    if pattern not in _CACHE:
        _CACHE[pattern] = re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)"))
    return _CACHE[pattern]


@dataclass(frozen=True)
class Table:
    """A model family's rows, plus the Megatron names a converter skips on purpose."""

    rules: tuple[Rule, ...]
    ignored: tuple[str, ...] = (r".*\._extra_state(/.*)?$",)  # Transformer Engine / FP8 bookkeeping

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignored)
