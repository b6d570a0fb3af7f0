"""`parity-check`: run the Megatron-Core model and the Hugging Face class on identical inputs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

from .errors import ClearErrorGroup, ConversionError
from .parity.checkpoint_safety import open_checked

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}



# Both commands read a Megatron checkpoint: the same opt-in past the safe loading.
TRUST_PICKLE = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Unpickle globals outside the allow-list in the Megatron checkpoint (runs code from the "
    "file: only for checkpoints you trust); without it every pickle is checked before megatron-core "
    "loads it.",
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
@TRUST_PICKLE
@click.option("--max-abs-diff", type=float, help="Override the dtype's tolerance (see README).")
@click.option("--min-top1", type=float, help="Override the minimum top-1 agreement.")
@click.option("--max-kl", type=float, help="Override the maximum mean KL(Megatron || HF).")
@click.option("--min-greedy", type=float, help="Override the minimum greedy-match share.")
def logits(
    megatron_dir,
    hf_dir,
    device,
    nproc,
    dtype,
    cases_spec,
    steps,
    report_dir,
    hf_attn,
    hf_projector_eps,
    hf_numerics,
    max_abs_diff,
    min_top1,
    max_kl,
    min_greedy,
    trust_pickle,
):
    """Logits, layer outputs and greedy generations of both codebases on identical token ids and pixels.
    Exit status 1 when a case is outside tolerance."""

    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank

    from .parity import cases as cases_mod
    from .parity import logits as parity
    from .parity import numerics
    from .parity import report as report_mod

    started = time.perf_counter()
    args = open_checked(megatron_dir, trust_pickle=trust_pickle).args
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if nproc is not None and nproc != layout.world_size:
        raise ConversionError(
            f"{megatron_dir}: saved at TP={layout.tp} PP={layout.pp}: it runs on "
            f"{layout.world_size} ranks, not {nproc}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no GPU is visible")
    config, tokenizer = _hf_side(hf_dir)
    cases = parity.build_cases(cases_spec, tokenizer, config)
    true_vocab = args.vocab_size
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tolerances = dict(parity.DEFAULT_TOLERANCES[dtype])
    for key, value in (
        ("max_abs_diff", max_abs_diff),
        ("min_top1_agreement", min_top1),
        ("max_kl", max_kl),
        ("min_greedy_match", min_greedy),
    ):
        if value is not None:
            tolerances[key] = value

    click.echo(
        f"Megatron: {megatron_dir} at TP={layout.tp} PP={layout.pp} ({layout.world_size} ranks), {dtype}"
    )
    job = ForwardJob(
        ModelSource(checkpoint=str(megatron_dir), trust_pickle=trust_pickle),
        layout,
        [{"input_ids": c.input_ids, "pixel_values": c.pixel_values} for c in cases],
        dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
        collect_layers=True,
        image_token_id=config.img_context_token_id,
        generate_tokens=steps,
        eos_token_id=eos,
    )
    megatron = run_ranks(forward_rank, layout, job, backend="nccl" if device == "cuda" else "gloo")
    megatron_seconds = time.perf_counter() - started

    click.echo(f"HF: {hf_dir} on {device}")
    model = parity.load_hf(hf_dir, DTYPES[dtype], device, attn=hf_attn, projector_eps=hf_projector_eps)
    sources = numerics.SOURCES if hf_numerics == "megatron" else ()
    rows = []
    with numerics.megatron_numerics(model, sources, output_rows=args.padded_vocab_size, tp=layout.tp):
        for k, case in enumerate(cases):
            hf_run = parity.run_hf(model, case, true_vocab)
            generated_h = parity.generate_hf(model, case, steps, eos) if steps else None
            generated_m = megatron["generated"][k] if steps else None
            prompt = cases_mod.prompt_difference(
                case.input_ids[0].tolist(), cases_mod.megatron_prompt_ids(case, tokenizer, config), tokenizer
            )
            rows.append(
                parity.compare_case(
                    case.name, case, megatron["outputs"][k], hf_run, generated_m, generated_h, prompt
                )
            )
    for row in rows:
        row["ok"] = parity.within(row, tolerances)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    report = {
        "megatron": str(megatron_dir),
        "hf": str(hf_dir),
        "tp": layout.tp,
        "pp": layout.pp,
        "dtype": dtype,
        "device": device_name,
        "hf_attn": hf_attn,
        "hf_projector_eps": hf_projector_eps,
        "hf_numerics": hf_numerics,
        "tolerances": tolerances,
        "cases": rows,
        "ok": all(r["ok"] for r in rows),
        "seconds": {"megatron": round(megatron_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
    written = report_mod.write(report_dir, report)
    click.echo(
        f"{'case':14} {'tokens':>6} {'max|d|':>9} {'mean|d|':>9} {'KL':>9} {'top-1':>7} {'top-5':>7} "
        f"{'greedy':>6}  first jump"
    )
    for row in rows:
        greedy = "-" if row["greedy_match"] is None else ("same" if row["greedy_match"] else "DIFF")
        click.echo(
            f"{row['name']:14} {row['tokens']:>6} {row['max_abs_diff']:>9.2e} {row['mean_abs_diff']:>9.2e} "
            f"{row['kl']:>9.2e} {row['top1_agreement']:>7.2%} {row['top5_agreement']:>7.2%} {greedy:>6}  "
            f"{row['first_jump'] or '-'}{'' if row['ok'] else '   <- outside tolerance'}"
        )
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
def bench(
    megatron_dir, hf_dir, data, limit, device, dtype, max_new_tokens, batch_size, report_dir, trust_pickle
):
    """Greedy answers of both codebases on a benchmark file, scored with the standard metrics (VQA
    accuracy, ANLS, relaxed accuracy, multiple choice, exact match): benchmark x {Megatron, HF, delta}."""

    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank
    from modeling.processing_nvlm_d import split_response

    from .parity import bench as bench_mod
    from .parity import cases as cases_mod
    from .parity import logits as parity

    args = open_checked(megatron_dir, trust_pickle=trust_pickle).args
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    config, tokenizer = _hf_side(hf_dir)
    items = bench_mod.load_items(data, limit)
    cases = cases_mod.prepare([bench_mod.as_case(item) for item in items], tokenizer, config)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    click.echo(f"{len(items)} items; Megatron at TP={layout.tp} PP={layout.pp}")
    job = ForwardJob(
        ModelSource(checkpoint=str(megatron_dir), trust_pickle=trust_pickle),
        layout,
        [],
        dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
        image_token_id=config.img_context_token_id,
        generate_tokens=max_new_tokens,
        eos_token_id=eos,
        generate_batch=batch_size,
        logits=False,
    )
    job.cases = [{"input_ids": c.input_ids, "pixel_values": c.pixel_values} for c in cases]
    megatron = run_ranks(forward_rank, layout, job, backend="nccl" if device == "cuda" else "gloo")
    model = parity.load_hf(hf_dir, DTYPES[dtype], device)

    def answer(tokens):
        return split_response(tokenizer.decode(tokens, skip_special_tokens=True))

    megatron_answers = [answer(tokens) for tokens in megatron["generated"]]
    hf_answers = [answer(parity.generate_hf(model, case, max_new_tokens, eos)) for case in cases]
    report = bench_mod.summarise(items, megatron_answers, hf_answers)
    report.update(
        {
            "megatron": str(megatron_dir),
            "hf": str(hf_dir),
            "dtype": dtype,
            "max_new_tokens": max_new_tokens,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
        }
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (report_dir / "report.md").write_text(bench_mod.markdown(report))
    click.echo(f"{'benchmark':14} {'n':>4} {'Megatron':>9} {'HF':>7} {'delta':>7}")
    for name, entry in report["benchmarks"].items():
        click.echo(
            f"{name:14} {entry['n']:>4} {entry['megatron']:>9.1f} {entry['hf']:>7.1f} {entry['delta']:>+7.1f}"
        )
    click.echo(f"report: {report_dir / 'report.json'}, {report_dir / 'report.md'}")


def _hf_side(hf_dir: Path):
    """The HF folder's config and tokenizer, or one line saying what is missing."""
    from transformers import AutoTokenizer

    from modeling import NVLM_D_Config

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir() or not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face folder)")
    try:
        config = NVLM_D_Config.from_pretrained(hf_dir)
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ConversionError(
            f"{hf_dir / 'config.json'}: not an NVLM-D config ({type(exc).__name__}: {reason})"
        ) from None
    if not (hf_dir / "tokenizer_config.json").is_file():
        raise ConversionError(
            f"{hf_dir}: no tokenizer (tokenizer_config.json missing); parity-check needs one"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ConversionError(
            f"{hf_dir}: the tokenizer does not load ({type(exc).__name__}: {reason})"
        ) from None
    return config, tokenizer


if __name__ == "__main__":
    main()
