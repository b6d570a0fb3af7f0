"""`make demo`: the main job of nvlm-port on the shipped, Megatron-trained example checkpoint.

tests/fixtures/nvlm-d-small-trained/megatron-tp2 is the `small` NVLM-D preset trained with
Megatron-Core on the synthetic benchmark families (scripts/train_tiny_nvlm.py, docs/TRAINING.md),
saved at TP=2 in Megatron-LM's legacy format. The demo

1. converts it to a Hugging Face folder with `convert-checkpoint megatron-to-hf` (progress bars);
2. loads the folder with `AutoModel.from_pretrained(..., trust_remote_code=True)` and asks it about
   a few pictures of the evaluation set;
3. runs `parity-check logits` (Megatron-Core at TP=2 on two gloo ranks vs our class, float32, CPU);
4. runs `parity-check bench` on the shipped evaluation set (tests/fixtures/synthetic-bench) and
   prints the table family x {majority baseline, Megatron, HF, delta}.

Everything lands in the folder `--out` names (demo-output/ by default): the converted model, both
reports (report.json / report.md) and the per-layer error plot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CHECKPOINT = FIXTURES / "nvlm-d-small-trained" / "megatron-tp2"
BENCH = FIXTURES / "synthetic-bench" / "bench.jsonl"
TOKENIZER = FIXTURES / "tiny-tokenizer"

# What megatron-core says on import and setup about accelerators this CPU demo does not use (Apex,
# Transformer Engine, CUDA_DEVICE_MAX_CONNECTIONS, CUDA graphs) and a deprecated torch.distributed
# call of its tensor-parallel gather: one copy per rank, dozens of lines that hide the demo's own
# output. Silenced here, for the demo's own CLI steps only (their PYTHONWARNINGS): the CLIs, the
# tests and any other use of megatron-core keep every warning.
QUIET_WARNINGS = (
    ("Apex is not installed", "UserWarning"),
    ("Transformer Engine and Apex are not installed", "UserWarning"),
    ("full scope is deprecated", "UserWarning"),
    ("When using async grad allreduce", "UserWarning"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated", "FutureWarning"),
)


def _quiet_env() -> dict:
    """The environment of a CLI step: the user's, plus the filters above in PYTHONWARNINGS."""
    filters = [f"ignore:{message}:{category}" for message, category in QUIET_WARNINGS]
    mine = os.environ.get("PYTHONWARNINGS")
    return {**os.environ, "PYTHONWARNINGS": ",".join([*filters, *([mine] if mine else [])])}


def _run(title: str, *arguments: str) -> None:
    """A CLI step as a subprocess: its output (and tqdm bars) go straight to the terminal."""
    click.secho(f"\n{title}\n$ {' '.join(arguments)}", bold=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *arguments], cwd=REPO, env=_quiet_env())
    if done.returncode:
        raise click.ClickException(f"{title}: exit status {done.returncode}")
    click.echo(f"({time.perf_counter() - started:.0f} s)")


def _chat(hf_dir: Path, count: int = 3) -> None:
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)  # the folder we just wrote
    from modeling.processing_nvlm_d import image_to_pixel_values

    entries = [json.loads(line) for line in BENCH.read_text().splitlines()]
    for entry in entries[:: len(entries) // count][:count]:
        image = Image.open(BENCH.parent / entry["image"]).convert("RGB")
        pixels = image_to_pixel_values(image, image_size=model.config.image_size, max_num=6)
        answer = model.chat(tokenizer, pixels, entry["question"], dict(max_new_tokens=16, do_sample=False))
        question = entry["question"].splitlines()[0]
        click.echo(
            f"  {entry['image']} ({image.width}x{image.height}, {pixels.shape[0]} tiles)  Q: {question}  "
            f"A: {answer!r}  (reference {entry['answers'][0]!r})"
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=REPO / "demo-output",
    show_default=True,
    help="Folder the demo writes into (replaced).",
)
def main(out: Path) -> None:
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    hf_dir = out / "nvlm-d-small-hf"
    sys.path.insert(0, str(REPO))
    _run(
        "1. convert the Megatron checkpoint (TP=2, legacy format) to Hugging Face safetensors",
        "converter.cli",
        "megatron-to-hf",
        str(CHECKPOINT),
        str(hf_dir),
        "--tokenizer",
        str(TOKENIZER),
    )
    click.secho(f"\n2. AutoModel.from_pretrained({hf_dir.name}, trust_remote_code=True) answers:", bold=True)
    _chat(hf_dir)
    _run(
        "3. logits parity: Megatron-Core (TP=2, two gloo ranks) vs the converted model, float32",
        "converter.parity_cli",
        "logits",
        "--megatron",
        str(CHECKPOINT),
        "--hf",
        str(hf_dir),
        "--report",
        str(out / "logits-report"),
    )
    _run(
        "4. benchmark parity on the shipped synthetic evaluation set (500 items, 5 families)",
        "converter.parity_cli",
        "bench",
        "--megatron",
        str(CHECKPOINT),
        "--hf",
        str(hf_dir),
        "--data",
        str(BENCH),
        "--report",
        str(out / "bench-report"),
    )
    report = json.loads((out / "bench-report" / "report.json").read_text())
    click.secho("\nfamily x {majority baseline, Megatron, HF, delta} (scores in %):", bold=True)
    click.echo(f"  {'family':16} {'baseline':>8} {'Megatron':>9} {'HF':>7} {'delta':>7}")
    for name, entry in report["benchmarks"].items():
        click.echo(
            f"  {name:16} {entry['majority']:>8.1f} {entry['megatron']:>9.1f} {entry['hf']:>7.1f} "
            f"{entry['delta']:>+7.1f}"
        )
    click.echo(
        f"\nreports: {out / 'logits-report'} (report.md, layer_errors.png), {out / 'bench-report'} "
        f"(report.md); {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
