"""`parity-check bench`: greedy answers of both codebases on a benchmark file, scored alike.

The file is JSONL, one item a line:
    {"id": "...", "benchmark": "chart", "image": "images/3.png" (or "images": [...], relative to the
     file; omit for text-only), "question": "...", "answers": ["..."], "metric": "vqa" | "anls" |
     "relaxed" | "mc" | "exact", "options": ["...", ...] (multiple choice only)}
Items are grouped by "benchmark" (default: the metric name). Both sides get the same token ids and
pixels; answers are decoded up to <|im_end|>.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import ConversionError
from .cases import Case
from .judge import describe
from .scoring import METRICS, score


@dataclass
class Item:
    id: str
    benchmark: str
    question: str
    answers: list[str]
    metric: str
    options: list[str] | None = None
    images: list[Path] = field(default_factory=list)


def load_items(path: Path, limit: int | None = None) -> list[Item]:
    path = Path(path)
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            images = entry.get("images") or ([entry["image"]] if entry.get("image") else [])
            item = Item(
                str(entry.get("id", number)),
                entry.get("benchmark", entry["metric"]),
                entry["question"],
                list(entry["answers"]),
                entry["metric"],
                entry.get("options"),
                [path.parent / image for image in images],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConversionError(f"{path}:{number}: not a benchmark item ({exc})") from None
        if item.metric not in METRICS:
            raise ConversionError(f"{path}:{number}: unknown metric {item.metric!r}")
        if len(item.images) > 1:
            raise ConversionError(f"{path}:{number}: one image per item is supported")
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def as_case(item: Item) -> Case:
    image = Image.open(item.images[0]).convert("RGB") if item.images else None
    return Case(item.id, item.question, image)


def summarise(items: list[Item], megatron_answers: list[str], hf_answers: list[str]) -> dict:
    per_item, benchmarks = [], {}
    for item, m, h in zip(items, megatron_answers, hf_answers):
        sm = score(item.metric, m, item.answers, item.options)
        sh = score(item.metric, h, item.answers, item.options)
        per_item.append(
            {
                "id": item.id,
                "benchmark": item.benchmark,
                "metric": item.metric,
                "references": item.answers,
                "megatron": m,
                "hf": h,
                "megatron_score": sm,
                "hf_score": sh,
                "same_answer": m == h,
            }
        )
        entry = benchmarks.setdefault(
            item.benchmark, {"metric": item.metric, "megatron": 0.0, "hf": 0.0, "n": 0}
        )
        entry["megatron"] += sm
        entry["hf"] += sh
        entry["n"] += 1
    for name, entry in benchmarks.items():
        entry["megatron"] = 100 * entry["megatron"] / entry["n"]
        entry["hf"] = 100 * entry["hf"] / entry["n"]
        entry["delta"] = entry["hf"] - entry["megatron"]
        entry["majority_answer"], entry["majority"] = majority_baseline(
            [item for item in items if item.benchmark == name]
        )
    return {"benchmarks": benchmarks, "items": per_item}


def majority_baseline(items: list[Item]) -> tuple[str, float]:
    """The trivial baseline: answer every item with the benchmark's most common (first) reference,
    scored with the benchmark's own metric (percent)."""
    answer = Counter(item.answers[0] for item in items).most_common(1)[0][0]
    total = sum(score(item.metric, answer, item.answers, item.options) for item in items)
    return answer, 100 * total / len(items)


def markdown_scores(benchmarks: dict, side: str = "megatron") -> str:
    """One codebase's scores beside the majority baseline (e.g. to judge a training run)."""
    lines = ["| benchmark | metric | n | majority baseline | score |", "|---|---|---|---|---|"]
    for name, entry in benchmarks.items():
        lines.append(
            f"| {name} | {entry['metric']} | {entry['n']} | {entry['majority']:.1f} "
            f"({entry['majority_answer']!r}) | {entry[side]:.1f} |"
        )
    mean = sum(entry[side] for entry in benchmarks.values()) / len(benchmarks)
    baseline = sum(entry["majority"] for entry in benchmarks.values()) / len(benchmarks)
    lines.append(f"| mean | | | {baseline:.1f} | {mean:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = [
        f"# Benchmark parity: {report['megatron']} vs {report['hf']}",
        "",
        f"{report['dtype']} on {report['device']}, greedy, up to {report['max_new_tokens']} new tokens",
        "",
        "| benchmark | metric | n | majority baseline | Megatron | HF | delta | Megatron fp32 | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["benchmarks"].items():
        reference = entry.get("megatron_fp32")
        lines.append(
            f"| {name} | {entry['metric']} | {entry['n']} | {entry['majority']:.1f} "
            f"| {entry['megatron']:.1f} | "
            f"{entry['hf']:.1f} | {entry['delta']:+.1f} | "
            f"{'-' if reference is None else f'{reference:.1f}'} | "
            f"{'yes' if entry.get('ok', True) else 'NO'} |"
        )
    checks = [(name, c) for name, entry in report["benchmarks"].items() for c in entry.get("checks", [])]
    if checks:
        lines += ["", "Checks:", "", *(f"- {name}: {describe(check)}" for name, check in checks)]
    differing = [item for item in report["items"] if not item["same_answer"]]
    lines += ["", f"Items whose answers differ between the codebases: {len(differing)}", ""]
    if differing:
        lines += ["| id | benchmark | Megatron | HF | scores |", "|---|---|---|---|---|"]
        for item in differing:
            lines.append(
                f"| {item['id']} | {item['benchmark']} | {item['megatron']!r} | {item['hf']!r} | "
                f"{item['megatron_score']:.2f} / {item['hf_score']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def add_reference(report: dict, items: list[Item], reference_answers: list[str]) -> None:
    """Megatron's float32 answers (the reference of a bf16 run) beside each item, and each family's
    float32 score as `megatron_fp32`."""
    totals: dict[str, float] = {}
    for item, row, answer in zip(items, report["items"], reference_answers):
        row["megatron_fp32"] = answer
        row["megatron_fp32_score"] = score(item.metric, answer, item.answers, item.options)
        totals[item.benchmark] = totals.get(item.benchmark, 0.0) + row["megatron_fp32_score"]
    for name, entry in report["benchmarks"].items():
        entry["megatron_fp32"] = 100 * totals[name] / entry["n"]
