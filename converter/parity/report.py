"""report.json, report.md and the per-layer error plot of a parity run."""

from __future__ import annotations

import json
from pathlib import Path

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
        f"tolerances: {json.dumps(report['tolerances'])}",
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
