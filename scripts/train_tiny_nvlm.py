"""Train a small NVLM-D with Megatron-Core on the synthetic benchmark families, save it as Megatron does.

    python scripts/train_tiny_nvlm.py --minutes 8 OUT          # one GPU (NCCL, world size 1)
    python scripts/train_tiny_nvlm.py --max-steps 3 --batch-size 2 --workers 0 OUT   # CPU smoke run

What it does, in order:
1. builds the `small` preset (modeling/presets.py) as Megatron-Core's LLaVAModel at TP=1, with the
   seeded initial weights of modeling/megatron/weights.py;
2. trains it on items generated on the fly (DataLoader workers) from the "train" split of
   scripts/synthetic_bench.py, disjoint from the evaluation set's "eval" split; NVLM's chat
   prompt (our `prepare`: system turn, tile tags, one placeholder per image embedding) and the loss on
   the answer tokens (and the closing <|im_end|>) only, as Megatron-LM's NVLM SFT does. AdamW, linear
   warm-up, cosine decay over a wall-clock budget (`--minutes`) or `--max-steps`;
3. scores the trained model with greedy answers on the evaluation set (`--eval`, Megatron side);
4. saves a legacy checkpoint at TP=1 (OUT/megatron-tp1), then re-shards it with `convert-checkpoint
   reshard` to TP=2 in the legacy format (OUT/megatron-tp2) and in torch_dist (OUT/megatron-tp2-dist);
5. writes OUT/training_log.json (settings, card, wall time, loss curves per family, eval scores) and,
   where matplotlib is installed, OUT/loss.png (or later: `--plot OUT/training_log.json`).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from synthetic_bench import FAMILIES, make_item  # noqa: E402 (beside this script)

from converter.parity import bench as bench_mod  # noqa: E402
from converter.parity.cases import Case, prepare  # noqa: E402
from modeling.presets import get_config, tokenizer_size  # noqa: E402

TOKENIZER = REPO / "tests" / "fixtures" / "tiny-tokenizer"
EVAL_SET = REPO / "tests" / "fixtures" / "synthetic-bench" / "bench.jsonl"


# -- data ---------------------------------------------------------------------------------------------


def encode(item, tokenizer, config) -> dict:
    """Prompt ids (image placeholders included) + answer ids + <|im_end|>; where the answer starts."""
    case = prepare([Case("", item.question, item.image)], tokenizer, config)[0]
    prompt = case.input_ids[0]
    answer = tokenizer(item.target + "<|im_end|>", add_special_tokens=False, return_tensors="pt").input_ids[0]
    return {
        "ids": torch.cat([prompt, answer]),
        "answer_start": len(prompt),
        "pixels": case.pixel_values,
        "family": FAMILIES.index(item.family),
    }


class SyntheticStream(IterableDataset):
    """Endless training items, the five families in turn; worker k takes items k, k + W, k + 2W..."""

    def __init__(self, seed: int, preset: str):
        self.seed, self.preset = seed, preset

    def __iter__(self):
        from transformers import AutoTokenizer

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)
        config = get_config(self.preset)
        for index in itertools.count(worker, workers):
            family = FAMILIES[index % len(FAMILIES)]
            yield encode(make_item("train", self.seed, family, index // len(FAMILIES)), tokenizer, config)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded ids; `mask[b, t]` marks positions whose NEXT token is an answer token."""
    length = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), length - 1, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e["ids"])] = e["ids"]
        mask[row, e["answer_start"] - 1 : len(e["ids"]) - 1] = True
    return {
        "ids": ids,
        "mask": mask,
        "pixels": torch.cat([e["pixels"] for e in examples]),
        "family": torch.tensor([e["family"] for e in examples]),
    }


# -- training ----------------------------------------------------------------------------------------


def learning_rate(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of the run, then cosine decay to peak / 10."""
    if progress < warmup:
        return peak * progress / warmup
    decay = (progress - warmup) / (1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, decay))))


def train_step(runner, model, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean answer-token loss, and the per-token losses (for the per-family curves)."""
    ids = batch["ids"].to(device, non_blocking=True)
    decoder_input = runner.embed_inputs(ids, batch["pixels"].to(device, non_blocking=True))
    logits = model.language_model(
        input_ids=None, position_ids=None, attention_mask=None, decoder_input=decoder_input
    )  # [b, s, padded vocab]; Megatron-LM trains over the padded vocabulary too
    mask = batch["mask"].to(device, non_blocking=True)
    losses = F.cross_entropy(logits[:, :-1][mask].float(), ids[:, 1:][mask], reduction="none")
    return losses.mean(), losses


def evaluate(runner, items, tokenizer, config, max_new_tokens: int) -> dict:
    from modeling.processing_nvlm_d import split_response

    cases = prepare([bench_mod.as_case(item) for item in items], tokenizer, config)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for start in range(0, len(cases), 64):
        batch = [(case.input_ids, case.pixel_values) for case in cases[start : start + 64]]
        for tokens in runner.generate_greedy_batch(batch, max_new_tokens, eos):
            answers.append(split_response(tokenizer.decode(tokens, skip_special_tokens=True)))
    return bench_mod.summarise(items, answers, answers)


def plot(log_path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    log = json.loads(Path(log_path).read_text())
    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in log["curve"]]
    axis.plot(steps, [r["loss"] for r in log["curve"]], color="black", label="all answers")
    for family in FAMILIES:
        points = [(r["step"], r["families"][family]) for r in log["curve"] if family in r["families"]]
        axis.plot(*zip(*points), label=family, alpha=0.7)
    axis.set(xlabel="step", ylabel="answer-token cross-entropy", yscale="log", title=log["title"])
    axis.legend()
    figure.tight_layout()
    out = Path(log_path).with_name("loss.png")
    figure.savefig(out, dpi=120)
    return out


def reshard(source: Path, out: Path, fmt: str) -> None:
    command = [sys.executable, "-m", "converter.cli", "reshard", str(source), str(out), "--tp", "2"]
    subprocess.run([*command, "--format", fmt], cwd=REPO, check=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="small", show_default=True)
@click.option("--minutes", type=float, default=8.0, show_default=True, help="Wall-clock training budget.")
@click.option("--max-steps", type=int, help="Stop after this many steps (and schedule over them).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--warmup", type=float, default=0.03, show_default=True, help="Warm-up share of the run.")
@click.option("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Initial weights and training items.")
@click.option("--eval", "eval_set", type=click.Path(path_type=Path), default=EVAL_SET, show_default=True)
@click.option("--eval-limit", type=int, help="Score only the first N evaluation items.")
@click.option("--plot", "plot_only", type=click.Path(path_type=Path, exists=True), help="Only redraw LOG.")
@click.argument("out", type=click.Path(path_type=Path), required=False)
def main(
    preset, minutes, max_steps, batch_size, lr, warmup, workers, seed, eval_set, eval_limit, plot_only, out
):
    if plot_only:
        click.echo(f"wrote {plot(plot_only)}")
        return
    if out is None:
        raise click.UsageError("OUT is required")
    from transformers import AutoTokenizer

    from modeling.megatron.args import megatron_args
    from modeling.megatron.builder import ParallelLayout, build_llava, padded_vocab_size
    from modeling.megatron.checkpoint import save_legacy, write_tracker
    from modeling.megatron.distributed import _free_port, init_rank, shutdown_rank
    from modeling.megatron.runner import MegatronRunner
    from modeling.megatron.weights import fill_seeded_weights

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)
    # The data workers start (fork) before CUDA and NCCL are initialised in this process.
    batches = iter(
        DataLoader(
            SyntheticStream(seed, preset),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=functools.partial(collate, pad_id=tokenizer.convert_tokens_to_ids("<|im_end|>")),
            pin_memory=cuda,
            prefetch_factor=8 if workers else None,
        )
    )
    layout = ParallelLayout(1, 1)
    init_rank(0, layout, "nccl" if cuda else "gloo", _free_port(), seed=seed)
    try:
        config = get_config(preset)
        vocab = tokenizer_size(preset)
        padded = padded_vocab_size(vocab, layout.tp)
        model = build_llava(
            config,
            layout,
            pp_rank=0,
            vocab_size=padded,
            tile_tag_ids=None,
            image_token_index=config.img_context_token_id,
            cpu=not cuda,
        )
        fill_seeded_weights(model, config, vocab_real=vocab, seed=seed)
        model.to(device)
        runner = MegatronRunner(
            model, image_token_id=config.img_context_token_id, true_vocab=vocab, device=device
        )
        parameters = sum(p.numel() for p in model.parameters())
        card = torch.cuda.get_device_name(0) if cuda else "CPU"
        click.echo(f"{preset}: {parameters:,} parameters, training on {card}")

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        model.train()
        budget = minutes * 60
        curve, window, step = [], [], 0
        started = time.perf_counter()
        for batch in batches:
            elapsed = time.perf_counter() - started
            progress = step / max_steps if max_steps else elapsed / budget
            if progress >= 1:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(progress, lr, warmup)
            loss, losses = train_step(runner, model, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            window.append((losses.detach(), batch))
            if step % 50 == 0 or (max_steps and step == max_steps):
                curve.append(_curve_point(step, elapsed, window))
                window = []
                point = curve[-1]
                click.echo(
                    f"step {step:6d}  {elapsed:6.0f} s  loss {point['loss']:.4f}  "
                    + "  ".join(f"{f} {v:.3f}" for f, v in point["families"].items())
                )
        seconds = time.perf_counter() - started
        click.echo(f"trained {step} steps ({step * batch_size:,} items) in {seconds:.0f} s")

        model.cpu()  # saved from host memory, as Megatron-LM's checkpoints load anywhere
        work = out.parent / f"{out.name}.partial"
        shutil.rmtree(work, ignore_errors=True)
        args = megatron_args(
            config,
            layout,
            padded_vocab=padded,
            divisible_by=128,
            dtype=torch.float32,
            spec="local",
            tokenizer_vocab=vocab,
        )
        args.seed, args.train_iters, args.micro_batch_size, args.lr = seed, step, batch_size, lr
        save_legacy(model, work / "megatron-tp1", args, iteration=step, tp_rank=0, pp_rank=0, spec="local")
        write_tracker(work / "megatron-tp1", step)

        model.to(device).eval()
        items = bench_mod.load_items(eval_set, eval_limit)
        scores = evaluate(runner, items, tokenizer, config, max_new_tokens=16)
        click.echo(bench_mod.markdown_scores(scores["benchmarks"], side="megatron"))
    finally:
        shutdown_rank()
    log = {
        "title": f"{preset} NVLM-D, {step} steps of {batch_size}, {card}",
        "preset": preset,
        "parameters": parameters,
        "card": card,
        "date": date.today().isoformat(),
        "command": " ".join(sys.argv),
        "steps": step,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
        "peak_lr": lr,
        "final_loss": curve[-1]["loss"] if curve else None,
        "eval": {"set": str(eval_set), "benchmarks": scores["benchmarks"]},
        "curve": curve,
    }
    (work / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (work / "eval_items.json").write_text(json.dumps(scores["items"], indent=1) + "\n")
    reshard(work / "megatron-tp1", work / "megatron-tp2", "torch")
    reshard(work / "megatron-tp1", work / "megatron-tp2-dist", "torch_dist")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    drawn = plot(out / "training_log.json")
    click.echo(
        f"wrote {out}: megatron-tp2, megatron-tp2-dist, training_log.json{', loss.png' if drawn else ''}"
    )


def _curve_point(step: int, elapsed: float, window) -> dict:
    losses = torch.cat([losses.float().cpu() for losses, _ in window])
    families = torch.cat([_token_families(batch) for _, batch in window])
    point = {"step": step, "seconds": round(elapsed, 1), "loss": float(losses.mean()), "families": {}}
    for k, family in enumerate(FAMILIES):
        chosen = losses[families == k]
        if len(chosen):
            point["families"][family] = float(chosen.mean())
    return point


def _token_families(batch) -> torch.Tensor:
    """The family of every answer token of a batch, in the order the loss lists them."""
    rows = batch["mask"].nonzero()[:, 0]
    return batch["family"][rows]


if __name__ == "__main__":
    main()
