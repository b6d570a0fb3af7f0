"""Whether a parity case (logits) or a benchmark family (bench) is within its thresholds.

Each threshold becomes a check: the metric, its value, the limit it is held to, pass or fail, and
where the threshold came from (tolerances.py). In bfloat16 the two codebases round at different
places, so ours is not held to Megatron's logits directly but to a noise floor, Megatron's own
bf16 error:
- `fp32`: both bf16 runs against a float32 run of the same weights (Megatron in float32, from the
  same checkpoint): ours may be no further from it than Megatron is, times the margin;
- `layout`: with `--megatron-other-layout`, Megatron at another TP/PP against itself: ours may
  differ from Megatron no more than Megatron differs from itself, times the margin.
A relative check passes when it passes against either floor that was run.
"""

from __future__ import annotations

import math

from .tolerances import LOGITS_KEYS, Threshold

_TINY = 1e-30


def _check(key, metric, value, limit, ok, threshold: Threshold, floor=None, setting=None) -> dict:
    return {
        "threshold": key,
        "metric": metric,
        "value": value,
        "limit": limit,
        "setting": threshold.value if setting is None else setting,
        "ok": bool(ok),
        "source": threshold.source,
        "floor": floor,
    }


def _absolute(row: dict, key: str, threshold: Threshold) -> dict | None:
    limit = threshold.value
    if key == "max_abs_diff":
        return _check(
            key, "max |ours - Megatron|", row["max_abs_diff"], limit, row["max_abs_diff"] <= limit, threshold
        )
    if key == "min_top1_agreement":
        value = row["top1_agreement"]
        return _check(key, "top-1 agreement with Megatron", value, limit, value >= limit, threshold)
    if key == "max_kl":
        return _check(key, "mean KL(Megatron || ours)", row["kl"], limit, row["kl"] <= limit, threshold)
    if key == "min_greedy_match":
        if row.get("greedy_match") is None:
            return None
        value = row["greedy_match"]
        return _check(key, "greedy continuation the same", value, limit, value >= limit, threshold)
    return None


def floors(row: dict) -> list[tuple[str, dict, dict]]:
    """(floor name, ours, Megatron's own error) pairs the row can be judged against."""
    pairs = []
    if row.get("vs_fp32"):
        pairs.append(("fp32", row["vs_fp32"]["hf"], row["vs_fp32"]["megatron"]))
    other = row.get("megatron_other_layout")
    if other:
        direct = {k: row[k] for k in ("kl", "max_abs_diff", "top1_agreement", "positions")}
        pairs.append((f"Megatron {other['layout']}", direct, other))
    return pairs


def _relative(key: str, threshold: Threshold, ours: dict, theirs: dict, floor: str) -> dict:
    against = "fp32" if floor == "fp32" else "Megatron"
    limit = threshold.value
    if key in ("max_kl_ratio", "max_abs_diff_ratio"):
        metric = "kl" if key == "max_kl_ratio" else "max_abs_diff"
        value = ours[metric] / max(theirs[metric], _TINY) if ours[metric] > 0 else 0.0
        label = (
            f"KL({against} || ours) / Megatron's"
            if metric == "kl"
            else f"max |ours - {against}| / Megatron's"
        )
        return _check(key, label, value, limit, value <= limit, threshold, floor)
    # top1_slack: extra argmax differences, counted in positions
    positions = ours["positions"]
    ours_misses = round((1 - ours["top1_agreement"]) * positions)
    their_misses = round((1 - theirs["top1_agreement"]) * positions)
    allowed = their_misses + math.ceil(limit * positions)
    return _check(
        key,
        f"argmax differences from {against} in {positions} positions (Megatron's: {their_misses})",
        ours_misses,
        allowed,
        ours_misses <= allowed,
        threshold,
        floor,
    )


def logits_checks(row: dict, thresholds: dict[str, Threshold]) -> list[dict]:
    checks = []
    available = floors(row)
    for key in LOGITS_KEYS:
        threshold = thresholds.get(key)
        if threshold is None or threshold.value is None:
            continue
        if key in ("max_kl_ratio", "max_abs_diff_ratio", "top1_slack"):
            if not available:
                continue
            tried = [_relative(key, threshold, ours, theirs, name) for name, ours, theirs in available]
            chosen = next((c for c in tried if c["ok"]), tried[0])
            if len(tried) > 1:
                chosen["other_floors"] = [c for c in tried if c is not chosen]
            checks.append(chosen)
        else:
            check = _absolute(row, key, threshold)
            if check is not None:
                checks.append(check)
    return checks


def bench_checks(entry: dict, thresholds: dict[str, Threshold]) -> list[dict]:
    checks = []
    delta = thresholds.get("max_abs_delta")
    if delta is not None and delta.value is not None:
        value = abs(entry["delta"])
        checks.append(
            _check(
                "max_abs_delta", "|HF - Megatron| (points)", value, delta.value, value <= delta.value, delta
            )
        )
    excess = thresholds.get("max_delta_excess")
    if excess is not None and excess.value is not None and entry.get("megatron_fp32") is not None:
        reference = entry["megatron_fp32"]
        value = abs(entry["hf"] - reference) - abs(entry["megatron"] - reference)
        checks.append(
            _check(
                "max_delta_excess",
                f"|HF - Megatron fp32| - |Megatron - Megatron fp32| (points; fp32 scored {reference:.1f})",
                value,
                excess.value,
                value <= excess.value,
                excess,
                "fp32",
            )
        )
    return checks


def describe(check: dict) -> str:
    """One line: what was measured, its value, the limit, and where the threshold came from."""
    relation = ">=" if check["threshold"].startswith("min_") else "<="
    verdict = "ok" if check["ok"] else "FAILED"
    floor = f", floor {check['floor']}" if check.get("floor") else ""
    setting = "" if check["setting"] == check["limit"] else f" ({check['threshold']} {check['setting']:g})"
    return (
        f"{check['threshold']}: {check['metric']} = {_fmt(check['value'])}, must be {relation} "
        f"{_fmt(check['limit'])}{setting}{floor} [{check['source']}]: {verdict}"
    )


def _fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"
