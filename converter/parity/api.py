"""The library API under `parity-check`: run the Megatron side and the Hugging Face class on identical
inputs and judge them (converter/parity_cli.py prints what these return).

    report, written = check_logits(LogitsOptions(megatron_dir, hf_dir, dtype="bf16"))
    report, written = check_bench(BenchOptions(megatron_dir, hf_dir, data))

Each returns the report (what report.json holds; `report["ok"]` is the verdict) and the files
written. Bad input raises ConversionError with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError
from ..model_card import add_parity_entry
from .checkpoint_safety import open_checked

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BUILDER = "nvlm-port's Megatron-Core builder (modeling/megatron/, installed megatron-core)"


@dataclass
class LogitsOptions:
    """`parity-check logits`: its options, under their parameter names (see its --help)."""

    megatron_dir: Path
    hf_dir: Path
    device: str = "cpu"
    nproc: int | None = None
    dtype: str = "fp32"
    cases_spec: str = "default"
    steps: int = 32
    report_dir: Path = Path("parity-report")
    hf_attn: str = "sdpa"
    hf_projector_eps: float | None = None
    hf_numerics: str = "shipped"
    max_abs_diff: float | None = None
    min_top1: float | None = None
    max_kl: float | None = None
    min_greedy: float | None = None
    other_layout_dir: Path | None = None
    trust_pickle: bool = False
    tolerances_file: Path | None = None
    junit_file: Path | None = None
    card_dir: Path | None = None
    megatron_lm: Path | None = None
    megatron_lm_flags: str = ""


@dataclass
class BenchOptions:
    """`parity-check bench`: its options, under their parameter names (see its --help)."""

    megatron_dir: Path
    hf_dir: Path
    data: Path
    limit: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    max_new_tokens: int = 16
    batch_size: int = 16
    report_dir: Path = Path("bench-report")
    trust_pickle: bool = False
    tolerances_file: Path | None = None
    junit_file: Path | None = None
    card_dir: Path | None = None
    megatron_lm: Path | None = None
    megatron_lm_flags: str = ""


def check_logits(options: LogitsOptions, log: Callable[[str], None] = print) -> tuple[dict, list[Path]]:
    """Logits, layer outputs and greedy generations of both codebases on identical token ids and
    pixels, each case judged against its thresholds; in bf16 Megatron also runs in float32, the
    reference of the relative thresholds."""

    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank

    from . import cases as cases_mod
    from . import judge, junit, numerics
    from . import logits as parity
    from . import megatron_lm as nvidia_side
    from . import report as report_mod
    from .tolerances import Tolerances

    started = time.perf_counter()
    args = open_checked(options.megatron_dir, trust_pickle=options.trust_pickle).args
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if options.nproc is not None and options.nproc != layout.world_size:
        raise ConversionError(
            f"{options.megatron_dir}: saved at TP={layout.tp} PP={layout.pp}: it runs on "
            f"{layout.world_size} ranks, not {options.nproc}"
        )
    check_gpus(options.device, options.megatron_dir, layout)
    config, tokenizer = hf_side(options.hf_dir)
    cases = parity.build_cases(options.cases_spec, tokenizer, config)
    true_vocab = args.vocab_size
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tolerances = Tolerances(
        "logits",
        options.dtype,
        options.tolerances_file,
        overrides={
            "--max-abs-diff": ("max_abs_diff", options.max_abs_diff),
            "--min-top1": ("min_top1_agreement", options.min_top1),
            "--max-kl": ("max_kl", options.max_kl),
            "--min-greedy": ("min_greedy_match", options.min_greedy),
        },
    )
    tolerances.check_names([case.name for case in cases])
    if options.other_layout_dir is not None and options.megatron_lm is not None:
        raise ConversionError("--megatron-other-layout runs nvlm-port's builder: not with --megatron-lm")
    if options.other_layout_dir is not None:
        other_args = open_checked(options.other_layout_dir, trust_pickle=options.trust_pickle).args
        other_layout = ParallelLayout(
            other_args.tensor_model_parallel_size, other_args.pipeline_model_parallel_size
        )
        if options.dtype != "bf16" or other_layout == layout or other_args.vocab_size != true_vocab:
            raise ConversionError(
                f"--megatron-other-layout {options.other_layout_dir}: needs --dtype bf16 and the same "
                f"model at another layout (it is TP={other_layout.tp} PP={other_layout.pp}, "
                f"vocab {other_args.vocab_size})"
            )
        check_gpus(options.device, options.other_layout_dir, other_layout)

    log(
        f"Megatron: {options.megatron_dir} at TP={layout.tp} PP={layout.pp} "
        f"({layout.world_size} ranks), {options.dtype}"
    )
    job = ForwardJob(
        ModelSource(checkpoint=str(options.megatron_dir), trust_pickle=options.trust_pickle),
        layout,
        [{"input_ids": c.input_ids, "pixel_values": c.pixel_values} for c in cases],
        dtype={"fp32": "float32", "bf16": "bfloat16"}[options.dtype],
        collect_layers=True,
        image_token_id=config.img_context_token_id,
        generate_tokens=options.steps,
        eos_token_id=eos,
    )
    backend = "nccl" if options.device == "cuda" else "gloo"
    reference = other = None
    if options.megatron_lm is not None:  # NVIDIA's model code, on the ids its own prompt path gives
        megatron, reference = nvidia_side.logits_side(
            options.megatron_lm,
            shlex.split(options.megatron_lm_flags),
            options.megatron_dir,
            options.hf_dir,
            cases,
            tokenizer,
            config,
            dtype=options.dtype,
            steps=options.steps,
            eos=eos,
            true_vocab=true_vocab,
            trust_pickle=options.trust_pickle,
        )
        log(megatron["megatron_code"])
    elif options.dtype == "bf16":  # the noise floors of the relative thresholds (converter/parity/judge.py)
        log("and Megatron in float32 on the same inputs: the reference of both bf16 runs")
        fp32 = dataclasses.replace(job, dtype="float32", collect_layers=False, generate_tokens=0)
        megatron = run_ranks(parity.forward_with_reference, layout, job, fp32, backend=backend)
        reference = [output.logits for output in megatron["reference"]]
        if options.other_layout_dir is not None:
            log(f"Megatron bf16 at TP={other_layout.tp} PP={other_layout.pp}: {options.other_layout_dir}")
            other = parity.megatron_logits(
                options.other_layout_dir,
                cases,
                "bfloat16",
                config,
                trust_pickle=options.trust_pickle,
                backend=backend,
            )
    else:
        megatron = run_ranks(forward_rank, layout, job, backend=backend)
    megatron_seconds = time.perf_counter() - started

    log(f"HF: {options.hf_dir} on {options.device}")
    model = parity.load_hf(
        options.hf_dir,
        DTYPES[options.dtype],
        options.device,
        attn=options.hf_attn,
        projector_eps=options.hf_projector_eps,
    )
    sources = numerics.SOURCES if options.hf_numerics == "megatron" else ()
    rows = []
    with numerics.megatron_numerics(model, sources, output_rows=args.padded_vocab_size, tp=layout.tp):
        for k, case in enumerate(cases):
            case_started = time.perf_counter()
            hf_run = parity.run_hf(model, case, true_vocab)
            generated_h = parity.generate_hf(model, case, options.steps, eos) if options.steps else None
            generated_m = megatron["generated"][k] if options.steps else None
            prompt = (
                megatron["prompts"][k]
                if "prompts" in megatron
                else cases_mod.prompt_difference(
                    case.input_ids[0].tolist(),
                    cases_mod.megatron_prompt_ids(case, tokenizer, config),
                    tokenizer,
                )
            )
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
    device_name = torch.cuda.get_device_name(0) if options.device == "cuda" else "CPU"
    report = {
        "megatron": str(options.megatron_dir),
        "hf": str(options.hf_dir),
        "tp": layout.tp,
        "pp": layout.pp,
        "dtype": options.dtype,
        "device": device_name,
        "hf_attn": options.hf_attn,
        "hf_projector_eps": options.hf_projector_eps,
        "hf_numerics": options.hf_numerics,
        "megatron_code": megatron.get("megatron_code", BUILDER),
        "megatron_lm": megatron.get("info"),
        "tolerances": tolerances.values(),
        "tolerance_sources": tolerances.to_json(),
        "reference": "Megatron float32, same checkpoint and inputs" if reference is not None else None,
        "megatron_other_layout": str(options.other_layout_dir) if other is not None else None,
        **report_mod.environment(),
        "cases": rows,
        "ok": all(r["ok"] for r in rows),
        "seconds": {"megatron": round(megatron_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
    written = report_mod.write(options.report_dir, report)
    if options.junit_file is not None:
        written.append(junit.write(options.junit_file, junit.logits_suite(report)))
    if options.card_dir is not None:
        written.append(add_parity_entry(options.card_dir, *report_mod.card_entry(report, "logits")))
    return report, written


def check_bench(options: BenchOptions, log: Callable[[str], None] = print) -> tuple[dict, list[Path]]:
    """Greedy answers of both codebases on a benchmark file, scored with the standard metrics, each
    family judged against its thresholds; in bf16 Megatron also answers in float32."""

    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank
    from modeling.processing_nvlm_d import split_response

    from . import bench as bench_mod
    from . import cases as cases_mod
    from . import judge, junit
    from . import logits as parity
    from . import megatron_lm as nvidia_side
    from . import report as report_mod
    from .tolerances import Tolerances

    started = time.perf_counter()
    args = open_checked(options.megatron_dir, trust_pickle=options.trust_pickle).args
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    check_gpus(options.device, options.megatron_dir, layout)
    config, tokenizer = hf_side(options.hf_dir)
    items = bench_mod.load_items(options.data, options.limit)
    tolerances = Tolerances("bench", options.dtype, options.tolerances_file)
    tolerances.check_names(sorted({item.benchmark for item in items}))
    cases = cases_mod.prepare([bench_mod.as_case(item) for item in items], tokenizer, config)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    log(f"{len(items)} items; Megatron at TP={layout.tp} PP={layout.pp}")
    job = ForwardJob(
        ModelSource(checkpoint=str(options.megatron_dir), trust_pickle=options.trust_pickle),
        layout,
        [],
        dtype={"fp32": "float32", "bf16": "bfloat16"}[options.dtype],
        image_token_id=config.img_context_token_id,
        generate_tokens=options.max_new_tokens,
        eos_token_id=eos,
        generate_batch=options.batch_size,
        logits=False,
    )
    job.cases = [{"input_ids": c.input_ids, "pixel_values": c.pixel_values} for c in cases]
    backend = "nccl" if options.device == "cuda" else "gloo"
    reference = None
    if options.megatron_lm is not None:  # NVIDIA's model code; both sides on the ids its prompt path gives
        megatron, reference = nvidia_side.bench_side(
            options.megatron_lm,
            shlex.split(options.megatron_lm_flags),
            options.megatron_dir,
            options.hf_dir,
            cases,
            tokenizer,
            config,
            dtype=options.dtype,
            steps=options.max_new_tokens,
            eos=eos,
            true_vocab=args.vocab_size,
            trust_pickle=options.trust_pickle,
        )
        log(megatron["megatron_code"])
    elif options.dtype == "bf16":  # the reference of max_delta_excess (converter/parity/judge.py)
        log("and Megatron in float32 on the same items: the reference of both bf16 runs")
        fp32 = dataclasses.replace(job, dtype="float32")
        megatron = run_ranks(parity.forward_with_reference, layout, job, fp32, backend=backend)
        reference = megatron["reference"]
    else:
        megatron = run_ranks(forward_rank, layout, job, backend=backend)
    model = parity.load_hf(options.hf_dir, DTYPES[options.dtype], options.device)

    def answer(tokens):
        return split_response(tokenizer.decode(tokens, skip_special_tokens=True))

    megatron_answers = [answer(tokens) for tokens in megatron["generated"]]
    hf_answers = [answer(parity.generate_hf(model, case, options.max_new_tokens, eos)) for case in cases]
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
            "megatron": str(options.megatron_dir),
            "hf": str(options.hf_dir),
            "data": str(options.data),
            "tp": layout.tp,
            "pp": layout.pp,
            "dtype": options.dtype,
            "max_new_tokens": options.max_new_tokens,
            "megatron_code": megatron.get("megatron_code", BUILDER),
            "device": torch.cuda.get_device_name(0) if options.device == "cuda" else "CPU",
            "tolerances": tolerances.values(),
            "tolerance_sources": tolerances.to_json(),
            **report_mod.environment(),
            "ok": all(entry["ok"] for entry in report["benchmarks"].values()),
            "seconds": {"total": round(time.perf_counter() - started, 1)},
        }
    )
    options.report_dir.mkdir(parents=True, exist_ok=True)
    (options.report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (options.report_dir / "report.md").write_text(bench_mod.markdown(report))
    written = [options.report_dir / "report.json", options.report_dir / "report.md"]
    if options.junit_file is not None:
        written.append(junit.write(options.junit_file, junit.bench_suite(report)))
    if options.card_dir is not None:
        written.append(add_parity_entry(options.card_dir, *report_mod.card_entry(report, "bench")))
    return report, written


def check_gpus(device: str, checkpoint: Path, layout) -> None:
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


def hf_side(hf_dir: Path):
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
