"""The thresholds a parity run is judged by: defaults per dtype, a `--tolerances` file, per-case
(logits) or per-family (bench) entries, command-line overrides, and where each one came from.

A tolerances file is JSON or TOML (by its suffix; `tomllib`), every table optional:

    [fp32]                        # every case (logits) and family (bench) run in float32
    max_abs_diff = 1e-4
    [bf16]
    max_kl_ratio = 1.5
    [cases."long text".bf16]      # one logits case, by its name
    top1_slack = 0.05
    [families.chart.bf16]         # one bench family, by its name
    max_delta_excess = 2.0

A value of `"off"` (or JSON null) turns a check off. Unknown tables, keys, case and family names
and non-numeric values are refused with one line naming the file and the key (exit status 2).
Precedence: command-line option > case or family entry > dtype table > default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError

DTYPES = ("fp32", "bf16")

# name -> what it bounds. Absolute thresholds compare ours with Megatron directly; the relative
# ones (bf16) compare ours with Megatron's own distance from a float32 run of the same weights.
LOGITS_KEYS = {
    "max_abs_diff": "max |logit difference|, ours vs Megatron",
    "min_top1_agreement": "share of positions with the same argmax, ours vs Megatron",
    "max_kl": "mean KL(Megatron || ours) over the positions",
    "min_greedy_match": "share of cases whose greedy continuation is the same",
    "max_kl_ratio": "KL(fp32 || ours) / KL(fp32 || Megatron), bf16",
    "max_abs_diff_ratio": "max |ours - fp32| / max |Megatron - fp32|, bf16",
    "top1_slack": "argmax differences from fp32 ours may have beyond Megatron's, as a share of the "
    "positions (rounded up), bf16",
}
BENCH_KEYS = {
    "max_abs_delta": "|HF score - Megatron score| per family, points",
    "max_delta_excess": "points by which |HF - Megatron fp32| may exceed |Megatron - Megatron fp32|, bf16",
}
RELATIVE = {"max_kl_ratio", "max_abs_diff_ratio", "top1_slack", "max_delta_excess"}

DEFAULTS = {
    # float32: both codebases compute the same function; only summation order differs.
    "fp32": {
        "max_abs_diff": 1e-4,
        "min_top1_agreement": 1.0,
        "max_kl": 1e-6,
        "min_greedy_match": 1.0,
        "max_abs_delta": 0.0,
    },
    # bfloat16: the two codebases round at different places, so ours is judged by its distance from
    # a float32 run of the same weights, against Megatron's own distance (docs/PARITY.md, margins).
    "bf16": {
        "max_kl_ratio": 1.5,
        "max_abs_diff_ratio": 2.0,
        "top1_slack": 0.02,
        "max_delta_excess": 1.0,
    },
}


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None: not checked
    source: str  # "default (bf16)", "FILE [bf16]", "FILE [cases.\"long text\".bf16]", "--max-kl"

    def to_json(self) -> dict:
        return {"value": self.value, "source": self.source}


class Tolerances:
    """The thresholds of one command (logits or bench) at one dtype."""

    def __init__(self, command: str, dtype: str, path: Path | None = None, overrides: dict | None = None):
        self.command, self.dtype, self.path = command, dtype, path
        self.keys = LOGITS_KEYS if command == "logits" else BENCH_KEYS
        self.section = "cases" if command == "logits" else "families"
        self._base = {key: Threshold(DEFAULTS[dtype].get(key), f"default ({dtype})") for key in self.keys}
        self._named: dict[str, dict[str, Threshold]] = {}
        if path is not None:
            self._read(load_file(path))
        for option, (key, value) in (overrides or {}).items():
            if value is not None:
                self._check_applies(key, option)
                self._base[key] = Threshold(float(value), option)
                for table in self._named.values():
                    table.pop(key, None)

    def _read(self, data: dict) -> None:
        where = str(self.path)
        for table, body in data.items():
            if table in DTYPES:
                for key, threshold in self._table(body, table).items():
                    if table == self.dtype:
                        self._base[key] = threshold
            elif table in ("cases", "families"):
                if not isinstance(body, dict):
                    raise ConversionError(f"{where}: [{table}] must map names to dtype tables")
                for name, per_dtype in body.items():
                    if not isinstance(per_dtype, dict):
                        raise ConversionError(f"{where}: [{table}.{_quote(name)}] must hold dtype tables")
                    for dtype, inner in per_dtype.items():
                        label = f"{table}.{_quote(name)}.{dtype}"
                        if dtype not in DTYPES:
                            raise ConversionError(
                                f"{where}: [{table}.{_quote(name)}] has {dtype!r}; expected fp32 or bf16"
                            )
                        parsed = self._table(inner, label, keys=_keys_of(table))
                        if table == self.section and dtype == self.dtype:
                            self._named.setdefault(name, {}).update(parsed)
            else:
                raise ConversionError(
                    f"{where}: unknown table {table!r} (expected fp32, bf16, cases, families)"
                )

    def _table(self, body, label: str, keys: dict | None = None) -> dict[str, Threshold]:
        where = str(self.path)
        if not isinstance(body, dict):
            raise ConversionError(f"{where}: [{label}] must be a table of thresholds")
        keys = keys if keys is not None else {**LOGITS_KEYS, **BENCH_KEYS}
        parsed = {}
        for key, value in body.items():
            if key not in keys:
                raise ConversionError(
                    f"{where}: [{label}] unknown threshold {key!r} (known: {', '.join(sorted(keys))})"
                )
            if key in RELATIVE and label.split(".")[-1] == "fp32":
                raise ConversionError(
                    f"{where}: [{label}] {key} applies to bf16 only (float32 is the reference)"
                )
            if value is None or value == "off":
                number = None
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConversionError(f'{where}: [{label}] {key} = {value!r}: expected a number or "off"')
            else:
                number = float(value)
            if key in self.keys:
                parsed[key] = Threshold(number, f"{where} [{label}]")
        return parsed

    def _check_applies(self, key: str, option: str) -> None:
        if key in RELATIVE and self.dtype == "fp32":
            raise ConversionError(f"{option} applies to --dtype bf16 only (float32 is the reference)")

    def check_names(self, names) -> None:
        """Refuse case or family entries that name nothing in this run (a typo would silently apply
        the dtype's thresholds instead)."""
        unknown = sorted(set(self._named) - set(names))
        if unknown:
            raise ConversionError(
                f"{self.path}: [{self.section}] names {', '.join(map(repr, unknown))}, not in this run "
                f"(it has {', '.join(map(repr, names))})"
            )

    def for_name(self, name: str) -> dict[str, Threshold]:
        return {**self._base, **self._named.get(name, {})}

    def values(self, name: str | None = None) -> dict[str, float | None]:
        return {key: t.value for key, t in (self.for_name(name) if name else self._base).items()}

    def to_json(self) -> dict:
        """Every threshold of the run with its source, and the case/family entries that differ."""
        return {
            "file": str(self.path) if self.path else None,
            "thresholds": {key: t.to_json() for key, t in self._base.items()},
            self.section: {
                name: {key: t.to_json() for key, t in table.items()} for name, table in self._named.items()
            },
        }


def _keys_of(section: str) -> dict:
    return LOGITS_KEYS if section == "cases" else BENCH_KEYS


def _quote(name: str) -> str:
    return json.dumps(name) if not name.replace("_", "").replace("-", "").isalnum() else name


def load_file(path: Path) -> dict:
    """A tolerances file as a dict: TOML for `.toml`, JSON otherwise; one line on any error."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConversionError(f"{path}: unreadable ({exc.strerror})") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConversionError(f"{path}: TOML needs Python 3.11+ (tomllib); use JSON") from None
            data = tomllib.loads(text.decode())
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ConversionError(f"{path}: not valid {kind} ({reason})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a table of dtypes (fp32, bf16), cases and families")
    return data
