"""report.json, report.md and the per-layer error plot of a parity run; the run's environment, the
console table of the bf16 noise floors, and the entry `--card` adds to a model card."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from .judge import describe

COLUMNS = (
    "max_abs_diff",
    "mean_abs_diff",
    "rel_l2",
    "cosine",
    "kl",
    "top1_agreement",
    "top5_agreement",
    "greedy_match",
)


def write(folder: Path, report: dict) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    written = [folder / "report.json", folder / "report.md"]
    plot = folder / "layer_errors.png"
    if plot_layers(report, plot):
        written.append(plot)
    return written


def markdown(report: dict) -> str:
    lines = [
        f"# Parity report: {report['megatron']} vs {report['hf']}",
        "",
        f"{report['dtype']} on {report['device']}, Megatron at TP={report['tp']} PP={report['pp']}; "
        f"tolerances: {json.dumps(report['tolerances'])} ({_sources(report)})",
        "",
        "| case | tokens | " + " | ".join(COLUMNS) + " | first jump | ok |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for case in report["cases"]:
        values = " | ".join(_fmt(case.get(c)) for c in COLUMNS)
        lines.append(
            f"| {case['name']} | {case['tokens']} | {values} | {case.get('first_jump') or '-'} | "
            f"{'yes' if case['ok'] else 'NO'} |"
        )
    if any(case.get("vs_fp32") for case in report["cases"]):
        lines += ["", f"## Against float32 ({report['reference']})", "", *_floor_markdown(report["cases"])]
    lines += ["", "## Checks", ""]
    for case in report["cases"]:
        lines += [f"- {case['name']}: {describe(check)}" for check in case.get("checks", [])]
    lines += [
        "",
        "## Prompt construction (not the logits inputs, which are shared)",
        "",
        "| case | ours | Megatron | first difference | ours from there | Megatron from there |",
        "|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        p = case["prompt_check"]
        lines.append(
            f"| {case['name']} | {p['ours_tokens']} | {p['megatron_tokens']} | "
            f"{'-' if p['identical'] else p['first_difference']} | {_cell(p['ours_from_there'])} | "
            f"{_cell(p['megatron_from_there'])} |"
        )
    lines += ["", f"Verdict: {'within tolerance' if report['ok'] else 'OUTSIDE tolerance'}", ""]
    return "\n".join(lines)


def _sources(report: dict) -> str:
    sources = report.get("tolerance_sources") or {}
    return f"from {sources['file']} and the defaults" if sources.get("file") else "the defaults"


def _floor_markdown(cases: list[dict]) -> list[str]:
    lines = [
        "| case | KL(fp32 \\|\\| Megatron) | KL(fp32 \\|\\| ours) | ratio | top-1 Megatron | top-1 ours | "
        "max abs Megatron | max abs ours | Megatron other layout: KL / top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        m, h = case["vs_fp32"]["megatron"], case["vs_fp32"]["hf"]
        other = case.get("megatron_other_layout")
        other_text = f"{other['layout']}: {other['kl']:.3g} / {other['top1_agreement']:.2%}" if other else "-"
        lines.append(
            f"| {case['name']} | {m['kl']:.3g} | {h['kl']:.3g} | {h['kl'] / max(m['kl'], 1e-30):.2f} | "
            f"{m['top1_agreement']:.2%} | {h['top1_agreement']:.2%} | {m['max_abs_diff']:.3g} | "
            f"{h['max_abs_diff']:.3g} | {other_text} |"
        )
    return lines


def floor_table(cases: list[dict]) -> str:
    """The console table of both bf16 runs against the float32 reference."""
    lines = [
        f"{'against fp32':14} {'KL Megatron':>11} {'KL ours':>9} {'ratio':>6} {'top-1 M':>8} "
        f"{'top-1 ours':>10} {'max|d| M':>9} {'max|d| ours':>11}"
    ]
    for case in cases:
        m, h = case["vs_fp32"]["megatron"], case["vs_fp32"]["hf"]
        lines.append(
            f"{case['name']:14} {m['kl']:>11.2e} {h['kl']:>9.2e} {h['kl'] / max(m['kl'], 1e-30):>6.2f} "
            f"{m['top1_agreement']:>8.2%} {h['top1_agreement']:>10.2%} {m['max_abs_diff']:>9.2e} "
            f"{h['max_abs_diff']:>11.2e}"
        )
    return "\n".join(lines)


def megatron_core_version() -> str | None:
    """The version of the megatron-core that ran (the imported package, not only the installed one)."""
    try:
        from megatron.core import package_info
    except ImportError:
        return None
    return package_info.__version__


def environment() -> dict:
    import torch
    import transformers

    from ..manifest import tool_version

    return {
        "megatron_core": megatron_core_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nvlm_port": tool_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }


def _run_line(report: dict, verdict: bool) -> str:
    thresholds = (
        Path(report["tolerance_sources"]["file"]).name if report["tolerance_sources"].get("file") else None
    )
    return (
        f"{report['date']} · {report['device']} · megatron-core {report['megatron_core']} · torch "
        f"{report['torch']} · thresholds: "
        f"{f'`{thresholds}` and the defaults' if thresholds else 'the defaults'}"
        f" · **{'within tolerance' if verdict else 'OUTSIDE tolerance'}**"
    )


def card_entry(report: dict, command: str) -> tuple[str, str]:
    """(key, markdown) of this run for the model card: one entry per command, dtype and layout."""
    layout = f"TP={report['tp']} PP={report['pp']}"
    if command == "bench":
        data = Path(report["data"]).name
        key = f"bench {report['dtype']} {layout} {data}"
        lines = [
            f"### `parity-check bench`, {report['dtype']}, Megatron at {layout}, `{data}`",
            "",
            _run_line(report, report["ok"]),
            "",
            "| family | metric | n | Megatron | HF | delta | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, entry in report["benchmarks"].items():
            lines.append(
                f"| {name} | {entry['metric']} | {entry['n']} | {entry['megatron']:.1f} | "
                f"{entry['hf']:.1f} | {entry['delta']:+.1f} | {'pass' if entry['ok'] else 'FAIL'} |"
            )
        return key, "\n".join(lines) + "\n"
    numerics = (
        ""
        if report.get("hf_numerics", "shipped") == "shipped"
        else f", --hf-numerics {report['hf_numerics']}"
    )
    key = f"logits {report['dtype']} {layout}{numerics.replace(', --', ' ')}"
    relative = any(case.get("vs_fp32") for case in report["cases"])
    lines = [
        f"### `parity-check logits`, {report['dtype']}, Megatron at {layout}{numerics}",
        "",
        _run_line(report, report["ok"]),
        "",
        "| case | tokens | max abs diff | top-1 | greedy | "
        + ("KL to fp32, ours / Megatron's | " if relative else "")
        + "result |",
        "|---|---|---|---|---|" + ("---|" if relative else "") + "---|",
    ]
    for case in report["cases"]:
        greedy = "-" if case["greedy_match"] is None else ("same" if case["greedy_match"] else "differs")
        ratio = ""
        if relative:
            m, h = case["vs_fp32"]["megatron"], case["vs_fp32"]["hf"]
            ratio = f"{h['kl'] / max(m['kl'], 1e-30):.2f} | "
        lines.append(
            f"| {case['name']} | {case['tokens']} | {case['max_abs_diff']:.2e} | "
            f"{case['top1_agreement']:.2%} | {greedy} | {ratio}{'pass' if case['ok'] else 'FAIL'} |"
        )
    return key, "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text) -> str:
    return "-" if text is None else "`" + repr(text)[1:-1].replace("|", "\\|") + "`"


def plot_layers(report: dict, path: Path) -> bool:
    """Per-layer relative error, one line per case, ViT and LLM towers side by side."""
    try:
        import matplotlib
    except ImportError:  # the plot can be redrawn later: python -m converter.parity.report DIR
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in report["cases"] if c.get("layers")]
    if not cases:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, tower, title in (
        (axes[0], ("vision", "projector"), "vision tower + projector"),
        (axes[1], ("llm",), "language model"),
    ):
        for index, case in enumerate(cases):
            rows = [r for r in case["layers"] if r["module"].split(".")[0] in tower]
            if rows:  # one colour per case in both panels
                ax.plot(
                    range(len(rows)),
                    [max(r["rel_l2"], 1e-12) for r in rows],
                    marker="o",
                    label=case["name"],
                    color=f"C{index}",
                )
                ax.set_xticks(
                    range(len(rows)),
                    [r["module"].replace("layers.", "") for r in rows],
                    rotation=60,
                    fontsize=7,
                )
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("relative L2 error of the module output")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Megatron vs HF, {report['dtype']}, TP={report['tp']} PP={report['pp']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1])
    plot_layers(json.loads((folder / "report.json").read_text()), folder / "layer_errors.png")
