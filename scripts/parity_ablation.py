"""Where the bfloat16 difference between Megatron-Core and our class comes from (issue 5, item 4).

    python3 scripts/parity_ablation.py --megatron CKPT --hf HF_DIR --device cuda --out DIR
    python3 scripts/parity_ablation.py --plot DIR/ablation.json        # the figure, where matplotlib is

Runs the Megatron checkpoint once (at its own TP/PP, layer outputs recorded), then our class from
the converted folder on the same token ids and pixels, once as shipped and once per variant of
converter/parity/numerics.py: each source of rounding difference made to round as Megatron-Core
does, alone and cumulatively. For every variant and case it reports the parity metrics against
Megatron (KL, top-1, max |diff|, the share of logits that are bit-identical, per-layer errors) and,
with a float32 copy of our class as the exact reference, how far each bfloat16 run is from exact
(KL(fp32 || run)): whether a source makes us closer to Megatron, to the exact function, or both.
At TP=1 every difference left after all sources is one this list does not name; at TP>1 Megatron's
own tensor-parallel reductions add theirs (NVLM_FACTS section 6.7).

Writes DIR/ablation.json, DIR/ablation.md, and DIR/ablation.png where matplotlib is installed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converter.parity import numerics  # noqa: E402
from converter.parity.api import DTYPES  # noqa: E402
from converter.parity.compare import first_jump, kl_per_position, layer_errors, logits_metrics  # noqa: E402
from converter.parity.logits import run_hf  # noqa: E402


def variants() -> list[tuple[str, tuple[str, ...]]]:
    """As shipped; each source alone; then the sources added one after another (the last: all)."""
    rows = [("as shipped", ())]
    rows += [(f"only {s}", (s,)) for s in numerics.SOURCES]
    rows += [
        ("+ " + " + ".join(numerics.SOURCES[: n + 1]), numerics.SOURCES[: n + 1])
        for n in range(1, len(numerics.SOURCES))
    ]
    return rows


def forward(model, case, true_vocab: int, layers: bool):
    """[positions, true vocab] logits on the model's device, and the recorded layer outputs."""
    run = run_hf(model, case, true_vocab, layers=layers, on_cpu=False)
    return run.logits[0], run.layers


def megatron_outputs(checkpoint: Path, cases, config, dtype: str, device: str):
    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank, read_args

    args = read_args(checkpoint)
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    job = ForwardJob(
        ModelSource(checkpoint=str(checkpoint)),
        layout,
        [{"input_ids": c.input_ids, "pixel_values": c.pixel_values} for c in cases],
        dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
        collect_layers=True,
        image_token_id=config.img_context_token_id,
    )
    outputs = run_ranks(forward_rank, layout, job, backend="nccl" if device == "cuda" else "gloo")["outputs"]
    return args, layout, outputs


def run(megatron_dir: Path, hf_dir: Path, device: str, dtype: str, cases_spec: str, truth: bool) -> dict:
    from transformers import AutoTokenizer

    from converter.parity.logits import build_cases, load_hf
    from modeling import NVLM_D_Config

    started = time.perf_counter()
    config = NVLM_D_Config.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    cases = build_cases(cases_spec, tokenizer, config)
    args, layout, megatron = megatron_outputs(megatron_dir, cases, config, dtype, device)
    true_vocab, padded_rows = args.vocab_size, args.padded_vocab_size
    click.echo(
        f"Megatron TP={layout.tp} PP={layout.pp} {dtype}: {time.perf_counter() - started:.0f} s", err=True
    )
    on = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    reference = {}
    if truth:
        exact = load_hf(hf_dir, torch.float32, device)
        for case in cases:
            reference[case.name] = forward(exact, case, true_vocab, layers=False)[0]
        del exact
        if device == "cuda":
            torch.cuda.empty_cache()
    model = load_hf(hf_dir, DTYPES[dtype], device)
    megatron_logits = [out.logits[0].to(on) for out in megatron]  # moved once, compared per variant
    megatron_rows = []
    for case, logits_m in zip(cases, megatron_logits):
        row = {"case": case.name, "tokens": int(case.input_ids.shape[1])}
        if truth:
            row["kl_from_fp32"] = kl_per_position(reference[case.name], logits_m).mean().item()
        megatron_rows.append(row)
    results = []
    for name, sources in variants():
        rows = []
        with numerics.megatron_numerics(model, sources, output_rows=padded_rows, tp=layout.tp):
            for k, case in enumerate(cases):
                logits_h, layers_h = forward(model, case, true_vocab, layers=True)
                logits_m = megatron_logits[k]
                metrics = logits_metrics(logits_m, logits_h)
                layers = layer_errors(megatron[k].layers, layers_h)
                row = {
                    "case": case.name,
                    "kl": metrics["kl"],
                    "top1_agreement": metrics["top1_agreement"],
                    "max_abs_diff": metrics["max_abs_diff"],
                    "identical_logits": (logits_m == logits_h).double().mean().item(),
                    "layers": layers,
                    "first_difference": next((r["module"] for r in layers if r["max_abs_diff"] != 0), None),
                    "first_jump": first_jump(layers),
                }
                if truth:
                    row["kl_from_fp32"] = kl_per_position(reference[case.name], logits_h).mean().item()
                rows.append(row)
        results.append({"variant": name, "sources": list(sources), "cases": rows})
        worst = min(r["top1_agreement"] for r in rows)
        click.echo(
            f"{name:60} KL mean {sum(r['kl'] for r in rows) / len(rows):.2e}  top-1 min {worst:.2%}  "
            f"identical {sum(r['identical_logits'] for r in rows) / len(rows):.1%}",
            err=True,
        )
    return {
        "megatron": str(megatron_dir),
        "hf": str(hf_dir),
        "tp": layout.tp,
        "pp": layout.pp,
        "dtype": dtype,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "megatron_vs_fp32": megatron_rows,
        "variants": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(report: dict) -> str:
    names = [r["case"] for r in report["megatron_vs_fp32"]]
    truth = "kl_from_fp32" in report["megatron_vs_fp32"][0]
    lines = [
        f"# The {report['dtype']} difference: Megatron TP={report['tp']} PP={report['pp']} vs ours",
        "",
        f"{report['device']}, torch {report['torch']}, {report['date']}. Per case: KL(Megatron || ours) / "
        "top-1 agreement; 'identical': share of logits bit-identical to Megatron's (mean over cases).",
        "",
        "| variant | " + " | ".join(names) + " | identical | first differing module (7-tile case) |",
        "|---|" + "---|" * len(names) + "---|---|",
    ]
    for v in report["variants"]:
        cells = [f"{r['kl']:.1e} / {r['top1_agreement']:.1%}" for r in v["cases"]]
        identical = sum(r["identical_logits"] for r in v["cases"]) / len(v["cases"])
        image = next((r for r in v["cases"] if "7" in r["case"]), v["cases"][-1])
        lines.append(
            f"| {v['variant']} | "
            + " | ".join(cells)
            + f" | {identical:.1%} | {image['first_difference'] or 'none'} |"
        )
    if truth:
        lines += [
            "",
            "Distance from the exact function (our class in float32): KL(fp32 || run), per case.",
            "",
            "| run | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            "| Megatron | "
            + " | ".join(f"{r['kl_from_fp32']:.1e}" for r in report["megatron_vs_fp32"])
            + " |",
        ]
        for v in report["variants"]:
            lines.append(
                f"| ours, {v['variant']} | "
                + " | ".join(f"{r['kl_from_fp32']:.1e}" for r in v["cases"])
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["variant"] for v in report["variants"]]
    cases = [r["case"] for r in report["megatron_vs_fp32"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 2), sharey=True)
    height = 0.8 / len(cases)
    for j, case in enumerate(cases):
        kl = [v["cases"][j]["kl"] for v in report["variants"]]
        top1 = [100 * v["cases"][j]["top1_agreement"] for v in report["variants"]]
        ys = [i + j * height for i in range(len(names))]
        left.barh(ys, [max(x, 1e-12) for x in kl], height=height, label=case)
        right.barh(ys, top1, height=height, label=case)
    left.set_xscale("log")
    left.set_xlabel("KL(Megatron || ours), mean over positions (0 drawn at 1e-12)")
    right.set_xlabel("top-1 agreement, %")
    lowest = min(100 * r["top1_agreement"] for v in report["variants"] for r in v["cases"])
    right.set_xlim(max(0.0, min(90.0, lowest - 2)), 100.5)
    right.axvline(99.5, color="k", lw=0.8, ls="--")
    left.axvline(1e-3, color="k", lw=0.8, ls="--")
    left.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names)
    left.invert_yaxis()
    right.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"{report['dtype']} on {report['device']}: Megatron TP={report['tp']} vs our class, per source"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--megatron", "megatron_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--hf", "hf_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda", show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True)
@click.option(
    "--cases", "cases_spec", default="default", show_default=True, help="default, or a cases JSON file."
)
@click.option("--no-truth", is_flag=True, help="Skip the float32 reference (saves its memory and time).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("ablation"), show_default=True)
@click.option(
    "--plot",
    "plot_json",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Only draw the figure of an existing ablation.json (next to it).",
)
def main(megatron_dir, hf_dir, device, dtype, cases_spec, no_truth, out, plot_json):
    """Attribute the Megatron-vs-HF difference to each source of rounding difference."""
    if plot_json:
        report = json.loads(plot_json.read_text())
        target = plot_json.with_suffix(".png")
        click.echo(target if plot(report, target) else "matplotlib is not installed")
        return
    if megatron_dir is None or hf_dir is None:
        raise click.UsageError("--megatron and --hf are required (or --plot JSON)")
    report = run(megatron_dir, hf_dir, device, dtype, cases_spec, truth=not no_truth)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "ablation.md").write_text(markdown(report))
    plot(report, out / "ablation.png")
    click.echo(markdown(report))


if __name__ == "__main__":
    main()
