"""`parity-check`: run the Megatron-Core model and the Hugging Face class on identical inputs."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import click
import torch

from .errors import ClearErrorGroup, ConversionError
from .model_card import add_parity_entry
from .parity.checkpoint_safety import open_checked

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BUILDER = "nvlm-port's Megatron-Core builder (modeling/megatron/, installed megatron-core)"



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
    other_layout_dir,
    trust_pickle,
    tolerances_file,
    junit_file,
    card_dir,
    megatron_lm,
    megatron_lm_flags,
):
    """Logits, layer outputs and greedy generations of both codebases on identical token ids and pixels.
    In bf16 Megatron also runs in float32, and each side's distance from that run is compared (the
    relative thresholds). Exit status 1 when a case is outside tolerance."""

    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank

    from .parity import cases as cases_mod
    from .parity import judge, junit, numerics
    from .parity import logits as parity
    from .parity import megatron_lm as nvidia_side
    from .parity import report as report_mod
    from .parity.tolerances import Tolerances

    started = time.perf_counter()
    args = open_checked(megatron_dir, trust_pickle=trust_pickle).args
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if nproc is not None and nproc != layout.world_size:
        raise ConversionError(
            f"{megatron_dir}: saved at TP={layout.tp} PP={layout.pp}: it runs on "
            f"{layout.world_size} ranks, not {nproc}"
        )
    _check_gpus(device, megatron_dir, layout)
    config, tokenizer = _hf_side(hf_dir)
    cases = parity.build_cases(cases_spec, tokenizer, config)
    true_vocab = args.vocab_size
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tolerances = Tolerances(
        "logits",
        dtype,
        tolerances_file,
        overrides={
            "--max-abs-diff": ("max_abs_diff", max_abs_diff),
            "--min-top1": ("min_top1_agreement", min_top1),
            "--max-kl": ("max_kl", max_kl),
            "--min-greedy": ("min_greedy_match", min_greedy),
        },
    )
    tolerances.check_names([case.name for case in cases])
    if other_layout_dir is not None and megatron_lm is not None:
        raise ConversionError("--megatron-other-layout runs nvlm-port's builder: not with --megatron-lm")
    if other_layout_dir is not None:
        other_args = open_checked(other_layout_dir, trust_pickle=trust_pickle).args
        other_layout = ParallelLayout(
            other_args.tensor_model_parallel_size, other_args.pipeline_model_parallel_size
        )
        if dtype != "bf16" or other_layout == layout or other_args.vocab_size != true_vocab:
            raise ConversionError(
                f"--megatron-other-layout {other_layout_dir}: needs --dtype bf16 and the same model at "
                f"another layout (it is TP={other_layout.tp} PP={other_layout.pp}, "
                f"vocab {other_args.vocab_size})"
            )
        _check_gpus(device, other_layout_dir, other_layout)

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
    backend = "nccl" if device == "cuda" else "gloo"
    reference = other = None
    if megatron_lm is not None:  # NVIDIA's model code, on the ids its own prompt path gives
        megatron, reference = nvidia_side.logits_side(
            megatron_lm, shlex.split(megatron_lm_flags), megatron_dir, hf_dir, cases, tokenizer, config,
            dtype=dtype, steps=steps, eos=eos, true_vocab=true_vocab, trust_pickle=trust_pickle,
        )  # fmt: skip
        click.echo(megatron["megatron_code"])
    elif dtype == "bf16":  # the noise floors of the relative thresholds (converter/parity/judge.py)
        click.echo("and Megatron in float32 on the same inputs: the reference of both bf16 runs")
        fp32 = dataclasses.replace(job, dtype="float32", collect_layers=False, generate_tokens=0)
        megatron = run_ranks(parity.forward_with_reference, layout, job, fp32, backend=backend)
        reference = [output.logits for output in megatron["reference"]]
        if other_layout_dir is not None:
            click.echo(f"Megatron bf16 at TP={other_layout.tp} PP={other_layout.pp}: {other_layout_dir}")
            other = parity.megatron_logits(
                other_layout_dir, cases, "bfloat16", config, trust_pickle=trust_pickle, backend=backend
            )
    else:
        megatron = run_ranks(forward_rank, layout, job, backend=backend)
    megatron_seconds = time.perf_counter() - started

    click.echo(f"HF: {hf_dir} on {device}")
    model = parity.load_hf(hf_dir, DTYPES[dtype], device, attn=hf_attn, projector_eps=hf_projector_eps)
    sources = numerics.SOURCES if hf_numerics == "megatron" else ()
    rows = []
    with numerics.megatron_numerics(model, sources, output_rows=args.padded_vocab_size, tp=layout.tp):
        for k, case in enumerate(cases):
            case_started = time.perf_counter()
            hf_run = parity.run_hf(model, case, true_vocab)
            generated_h = parity.generate_hf(model, case, steps, eos) if steps else None
            generated_m = megatron["generated"][k] if steps else None
            prompt = megatron["prompts"][k] if "prompts" in megatron else cases_mod.prompt_difference(
                case.input_ids[0].tolist(), cases_mod.megatron_prompt_ids(case, tokenizer, config), tokenizer
            )  # fmt: skip
            row = parity.compare_case(
                case.name, case, megatron["outputs"][k], hf_run, generated_m, generated_h, prompt
            )
            if reference is not None:
                row["vs_fp32"] = {
                    "megatron": parity.distance(reference[k], megatron["outputs"][k].logits),
                    "hf": parity.distance(reference[k], hf_run.logits),
                }
            if other is not None:
                row["megatron_other_layout"] = {
                    "layout": f"TP={other_layout.tp} PP={other_layout.pp}",
                    **parity.distance(megatron["outputs"][k].logits, other[k]),
                }
            row["hf_seconds"] = round(time.perf_counter() - case_started, 3)
            rows.append(row)
    for row in rows:
        thresholds = tolerances.for_name(row["name"])
        row["thresholds"] = {key: t.to_json() for key, t in thresholds.items()}
        row["checks"] = judge.logits_checks(row, thresholds)
        row["ok"] = all(check["ok"] for check in row["checks"])
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
        "megatron_code": megatron.get("megatron_code", BUILDER),
        "megatron_lm": megatron.get("info"),
        "tolerances": tolerances.values(),
        "tolerance_sources": tolerances.to_json(),
        "reference": "Megatron float32, same checkpoint and inputs" if reference is not None else None,
        "megatron_other_layout": str(other_layout_dir) if other is not None else None,
        **report_mod.environment(),
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
    if reference is not None:
        click.echo(report_mod.floor_table(rows))
    for row in rows:
        for check in row["checks"]:
            if not check["ok"]:
                click.echo(f"{row['name']}: {judge.describe(check)}")
    if junit_file is not None:
        written.append(junit.write(junit_file, junit.logits_suite(report)))
    if card_dir is not None:
        written.append(add_parity_entry(card_dir, *report_mod.card_entry(report, "logits")))
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
def bench(
    megatron_dir,
    hf_dir,
    data,
    limit,
    device,
    dtype,
    max_new_tokens,
    batch_size,
    report_dir,
    trust_pickle,
    tolerances_file,
    junit_file,
    card_dir,
    megatron_lm,
    megatron_lm_flags,
):
    """Greedy answers of both codebases on a benchmark file, scored with the standard metrics (VQA
    accuracy, ANLS, relaxed accuracy, multiple choice, exact match): benchmark x {Megatron, HF, delta}.
    In bf16 Megatron also answers in float32 (the reference of the relative threshold). Exit status 1
    when a family is outside tolerance."""

    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank
    from modeling.processing_nvlm_d import split_response

    from .parity import bench as bench_mod
    from .parity import cases as cases_mod
    from .parity import judge, junit
    from .parity import logits as parity
    from .parity import megatron_lm as nvidia_side
    from .parity import report as report_mod
    from .parity.tolerances import Tolerances

    started = time.perf_counter()
    args = open_checked(megatron_dir, trust_pickle=trust_pickle).args
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    _check_gpus(device, megatron_dir, layout)
    config, tokenizer = _hf_side(hf_dir)
    items = bench_mod.load_items(data, limit)
    tolerances = Tolerances("bench", dtype, tolerances_file)
    tolerances.check_names(sorted({item.benchmark for item in items}))
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
    backend = "nccl" if device == "cuda" else "gloo"
    reference = None
    if megatron_lm is not None:  # NVIDIA's model code; both sides on the ids its prompt path gives
        megatron, reference = nvidia_side.bench_side(
            megatron_lm, shlex.split(megatron_lm_flags), megatron_dir, hf_dir, cases, tokenizer, config,
            dtype=dtype, steps=max_new_tokens, eos=eos, true_vocab=args.vocab_size, trust_pickle=trust_pickle,
        )  # fmt: skip
        click.echo(megatron["megatron_code"])
    elif dtype == "bf16":  # the reference of max_delta_excess (converter/parity/judge.py)
        click.echo("and Megatron in float32 on the same items: the reference of both bf16 runs")
        fp32 = dataclasses.replace(job, dtype="float32")
        megatron = run_ranks(parity.forward_with_reference, layout, job, fp32, backend=backend)
        reference = megatron["reference"]
    else:
        megatron = run_ranks(forward_rank, layout, job, backend=backend)
    model = parity.load_hf(hf_dir, DTYPES[dtype], device)

    def answer(tokens):
        return split_response(tokenizer.decode(tokens, skip_special_tokens=True))

    megatron_answers = [answer(tokens) for tokens in megatron["generated"]]
    hf_answers = [answer(parity.generate_hf(model, case, max_new_tokens, eos)) for case in cases]
    report = bench_mod.summarise(items, megatron_answers, hf_answers)
    if reference is not None:
        bench_mod.add_reference(report, items, [answer(tokens) for tokens in reference])
    for name, entry in report["benchmarks"].items():
        thresholds = tolerances.for_name(name)
        entry["thresholds"] = {key: t.to_json() for key, t in thresholds.items()}
        entry["checks"] = judge.bench_checks(entry, thresholds)
        entry["ok"] = all(check["ok"] for check in entry["checks"])
    report.update(
        {
            "megatron": str(megatron_dir),
            "hf": str(hf_dir),
            "data": str(data),
            "tp": layout.tp,
            "pp": layout.pp,
            "dtype": dtype,
            "max_new_tokens": max_new_tokens,
            "megatron_code": megatron.get("megatron_code", BUILDER),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
            "tolerances": tolerances.values(),
            "tolerance_sources": tolerances.to_json(),
            **report_mod.environment(),
            "ok": all(entry["ok"] for entry in report["benchmarks"].values()),
            "seconds": {"total": round(time.perf_counter() - started, 1)},
        }
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (report_dir / "report.md").write_text(bench_mod.markdown(report))
    click.echo(f"{'benchmark':14} {'n':>4} {'Megatron':>9} {'HF':>7} {'delta':>7}")
    for name, entry in report["benchmarks"].items():
        click.echo(
            f"{name:14} {entry['n']:>4} {entry['megatron']:>9.1f} {entry['hf']:>7.1f} {entry['delta']:>+7.1f}"
            f"{'' if entry['ok'] else '   <- outside tolerance'}"
        )
        for check in entry["checks"]:
            if not check["ok"]:
                click.echo(f"{name}: {judge.describe(check)}")
    written = [report_dir / "report.json", report_dir / "report.md"]
    if junit_file is not None:
        written.append(junit.write(junit_file, junit.bench_suite(report)))
    if card_dir is not None:
        written.append(add_parity_entry(card_dir, *report_mod.card_entry(report, "bench")))
    click.echo(f"report: {', '.join(str(p) for p in written)}")
    click.echo("within tolerance" if report["ok"] else "OUTSIDE tolerance")
    sys.exit(0 if report["ok"] else 1)


def _check_gpus(device: str, checkpoint: Path, layout) -> None:
    """On CUDA every Megatron rank needs a GPU of its own: NCCL refuses two ranks on one GPU."""
    if device != "cuda":
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ConversionError("--device cuda: no GPU is visible")
    if visible < layout.world_size:
        raise ConversionError(
            f"--device cuda: {checkpoint} runs at TP={layout.tp} PP={layout.pp} on {layout.world_size} "
            f"ranks, one GPU each (NCCL refuses two ranks on one GPU), and {visible} GPU(s) are visible"
        )


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
