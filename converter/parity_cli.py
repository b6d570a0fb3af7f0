"""`parity-check`: run the Megatron-Core model and the Hugging Face class on identical inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import ClearErrorGroup
from .parity.api import DTYPES  # the --dtype choices

# Both commands read a Megatron checkpoint: the same opt-in past the safe loading.
TRUST_PICKLE = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Unpickle globals outside the allow-list in the Megatron checkpoint (runs code from the "
    "file: only for checkpoints you trust); without it every pickle is checked before megatron-core "
    "loads it.",
)

# The CI outputs of both commands (converter/parity/tolerances.py, junit.py, model_card.py).
TOLERANCES = click.option(
    "--tolerances",
    "tolerances_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Thresholds per dtype, and per case (logits) or family (bench): JSON, or TOML by the .toml "
    "suffix (format: converter/parity/tolerances.py). The report records where each threshold came from.",
)
JUNIT = click.option(
    "--junit",
    "junit_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write JUnit XML: one test case per prompt case (logits) or benchmark family (bench), "
    "failures naming the metric, its value and the threshold.",
)
CARD = click.option(
    "--card",
    "card_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Add the figures to FOLDER/README.md (the model card of a converted folder; a run replaces "
    "its own earlier entry) and re-seal the card's entry in FOLDER/nvlm_port_manifest.json.",
)
# The Megatron side from NVIDIA's own model code instead of ours (converter/parity/megatron_lm.py).
MEGATRON_LM = click.option(
    "--megatron-lm",
    "megatron_lm",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="A Megatron-LM checkout (NVLM-1.0 or current): the Megatron side is NVIDIA's model, built by "
    "its examples/multimodal model_provider from the checkpoint's args and loaded by its "
    "load_checkpoint on the checkpoint's TP/PP ranks, with its own prompt path (Transformer Engine "
    "emulated where absent). Default: nvlm-port's own Megatron-Core builder.",
)
MEGATRON_LM_FLAGS = click.option(
    "--megatron-lm-flags",
    default="",
    help="With --megatron-lm: Megatron-LM flags the checkpoint's args lack (one string, e.g. for a "
    "checkpoint nvlm-port wrote: '--language-model-type qwen2.0_72B --decoder-seq-length 3200 ...').",
)


@click.group(cls=ClearErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nvlm-port")
def main() -> None:
    """Compare a Megatron-Core NVLM-D checkpoint with its Hugging Face conversion: logits over every
    position, every layer's output, greedy generations, and the prompt each codebase would build."""


@main.command()
@click.option(
    "--megatron",
    "megatron_dir",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="Megatron checkpoint (legacy or torch_dist); it runs at its own TP/PP.",
)
@click.option(
    "--hf",
    "hf_dir",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="The converted Hugging Face folder (with its tokenizer).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--nproc", type=int, help="Megatron ranks (default and only valid value: the checkpoint's TP*PP)."
)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True)
@click.option(
    "--cases",
    "cases_spec",
    default="default",
    show_default=True,
    help="'default' (short text, 1k+ token text, 1-tile and 7-tile images, two turns) or a JSON file.",
)
@click.option("--generate", "steps", type=int, default=32, show_default=True, help="Greedy tokens per case.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=Path("parity-report"),
    show_default=True,
    help="Folder for report.json, report.md and layer_errors.png.",
)
@click.option(
    "--hf-attn",
    type=click.Choice(["sdpa", "eager"]),
    default="sdpa",
    show_default=True,
    help="Attention of the HF side (ablation of the attention-kernel difference).",
)
@click.option(
    "--hf-projector-eps",
    type=float,
    help="Override the HF projector LayerNorm eps (ablation: the release uses 1e-5, Megatron 1e-6).",
)
@click.option(
    "--hf-numerics",
    type=click.Choice(["shipped", "megatron"]),
    default="shipped",
    show_default=True,
    help="megatron: the HF side rounds where Megatron-Core's local spec rounds (attention, RMSNorm, "
    "bias adds, GEMM shapes, the TP ranks' partial sums: converter/parity/numerics.py). At TP=1 and 2 "
    "the two sides then agree bit for bit in bf16, so any difference left is a real one.",
)
@click.option(
    "--megatron-other-layout",
    "other_layout_dir",
    type=click.Path(path_type=Path, exists=True),
    help="bf16: the same weights saved at another TP/PP (convert-checkpoint reshard); Megatron's "
    "difference from itself across layouts becomes a second noise floor for the relative checks.",
)
@TRUST_PICKLE
@TOLERANCES
@JUNIT
@CARD
@MEGATRON_LM
@MEGATRON_LM_FLAGS
@click.option("--max-abs-diff", type=float, help="Override the dtype's tolerance (see README).")
@click.option("--min-top1", type=float, help="Override the minimum top-1 agreement.")
@click.option("--max-kl", type=float, help="Override the maximum mean KL(Megatron || HF).")
@click.option("--min-greedy", type=float, help="Override the minimum greedy-match share.")
def logits(**options):
    """Logits, layer outputs and greedy generations of both codebases on identical token ids and pixels.
    In bf16 Megatron also runs in float32, and each side's distance from that run is compared (the
    relative thresholds). Exit status 1 when a case is outside tolerance."""
    from .parity import api, judge
    from .parity import report as report_mod

    report, written = api.check_logits(api.LogitsOptions(**options), log=click.echo)
    click.echo(
        f"{'case':14} {'tokens':>6} {'max|d|':>9} {'mean|d|':>9} {'KL':>9} {'top-1':>7} {'top-5':>7} "
        f"{'greedy':>6}  first jump"
    )
    for row in report["cases"]:
        greedy = "-" if row["greedy_match"] is None else ("same" if row["greedy_match"] else "DIFF")
        click.echo(
            f"{row['name']:14} {row['tokens']:>6} {row['max_abs_diff']:>9.2e} {row['mean_abs_diff']:>9.2e} "
            f"{row['kl']:>9.2e} {row['top1_agreement']:>7.2%} {row['top5_agreement']:>7.2%} {greedy:>6}  "
            f"{row['first_jump'] or '-'}{'' if row['ok'] else '   <- outside tolerance'}"
        )
    if report["reference"] is not None:
        click.echo(report_mod.floor_table(report["cases"]))
    for row in report["cases"]:
        for check in row["checks"]:
            if not check["ok"]:
                click.echo(f"{row['name']}: {judge.describe(check)}")
    click.echo(f"report: {', '.join(str(p) for p in written)}")
    click.echo("within tolerance" if report["ok"] else "OUTSIDE tolerance")
    sys.exit(0 if report["ok"] else 1)


@main.command()
@click.option("--megatron", "megatron_dir", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--hf", "hf_dir", type=click.Path(path_type=Path, exists=True), required=True)
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help="Benchmark JSONL (see converter/parity/bench.py for the fields).",
)
@click.option("--limit", type=int, help="Score only the first N items.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="fp32", show_default=True)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Items the Megatron side generates together (right-padded; each row as if alone).",
)
@click.option(
    "--report", "report_dir", type=click.Path(path_type=Path), default=Path("bench-report"), show_default=True
)
@TRUST_PICKLE
@TOLERANCES
@JUNIT
@CARD
@MEGATRON_LM
@MEGATRON_LM_FLAGS
def bench(**options):
    """Greedy answers of both codebases on a benchmark file, scored with the standard metrics (VQA
    accuracy, ANLS, relaxed accuracy, multiple choice, exact match): benchmark x {Megatron, HF, delta}.
    In bf16 Megatron also answers in float32 (the reference of the relative threshold). Exit status 1
    when a family is outside tolerance."""
    from .parity import api, judge

    report, written = api.check_bench(api.BenchOptions(**options), log=click.echo)
    click.echo(f"{'benchmark':14} {'n':>4} {'Megatron':>9} {'HF':>7} {'delta':>7}")
    for name, entry in report["benchmarks"].items():
        click.echo(
            f"{name:14} {entry['n']:>4} {entry['megatron']:>9.1f} {entry['hf']:>7.1f} {entry['delta']:>+7.1f}"
            f"{'' if entry['ok'] else '   <- outside tolerance'}"
        )
        for check in entry["checks"]:
            if not check["ok"]:
                click.echo(f"{name}: {judge.describe(check)}")
    click.echo(f"report: {', '.join(str(p) for p in written)}")
    click.echo("within tolerance" if report["ok"] else "OUTSIDE tolerance")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
