"""Run the seeded Megatron NVLM-D at several TP sizes on identical inputs and compare the logits.

    python scripts/megatron_tp_agreement.py --preset nvlm-d-72b --num-layers 2 --vision-num-layers 2 \
        --tp 1 --tp 2 --dtype bfloat16 --json results.json

On GPUs each layout runs with NCCL on TP GPUs; on a CPU-only host with gloo. The inputs are a text
prompt (random token ids) and a 7-tile image prompt (6 tiles + thumbnail, each tile a 5-token tag
and its image placeholders), with seeded random pixels. The weights do not depend on TP (see
modeling/megatron/weights.py), so every difference is the arithmetic of the parallel layout.
Prints a table and writes it as JSON.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.megatron.builder import ParallelLayout  # noqa: E402
from modeling.megatron.distributed import run_ranks  # noqa: E402
from modeling.megatron.runner import expand_image_tokens  # noqa: E402
from modeling.megatron.session import ForwardJob, ModelSource, forward_rank  # noqa: E402
from modeling.presets import get_config, tokenizer_size  # noqa: E402


def make_cases(preset: str, overrides: dict, text_len: int) -> list[dict]:
    config = get_config(preset, **overrides)
    vocab = tokenizer_size(preset)
    image_token = config.img_context_token_id or vocab - 1
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(0, min(vocab, 150000), (1, text_len), generator=generator)
    words[words == image_token] = 0
    tags = [torch.randint(0, 900, (5,), generator=generator).tolist() for _ in range(7)]
    native = torch.cat([words[:, :32], torch.tensor([[image_token]]), words[:, 32:64]], dim=1)
    image_ids = expand_image_tokens(
        native, image_token, tags, num_tiles=7, tokens_per_tile=config.num_image_token
    )
    size = config.image_size
    pixels = torch.randn(7, 3, size, size, generator=generator)
    return [{"input_ids": words, "pixel_values": None}, {"input_ids": image_ids, "pixel_values": pixels}]


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (ours - ref).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "rel_l2": ((ours - ref).norm() / ref.norm()).item(),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "logit_scale": ref.abs().max().item(),
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="nvlm-d-72b", show_default=True)
@click.option("--num-layers", type=int, default=2, show_default=True)
@click.option("--vision-num-layers", type=int, default=2, show_default=True)
@click.option("--tp", "tps", type=int, multiple=True, default=(1, 2), show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="bfloat16", show_default=True)
@click.option("--text-len", type=int, default=512, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path))
def main(preset, num_layers, vision_num_layers, tps, dtype, text_len, json_out):
    overrides = {"llm_num_hidden_layers": num_layers, "vision_num_hidden_layers": vision_num_layers}
    cases = make_cases(preset, overrides, text_len)
    names = ["text", "7-tile image"]
    runs = {}
    for tp in tps:
        layout = ParallelLayout(tp, 1)
        start = time.perf_counter()
        result = run_ranks(
            forward_rank, layout, ForwardJob(ModelSource(preset, overrides), layout, cases, dtype=dtype)
        )
        runs[tp] = {"outputs": result["outputs"], "seconds": time.perf_counter() - start}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    rows = []
    ref_tp = tps[0]
    for tp in tps[1:]:
        for name, ours, ref in zip(names, runs[tp]["outputs"], runs[ref_tp]["outputs"]):
            rows.append(
                {
                    "case": name,
                    "tp": tp,
                    "vs_tp": ref_tp,
                    "tokens": ours.logits.shape[1],
                    **compare(ours.logits, ref.logits),
                }
            )
    report = {
        "date": date.today().isoformat(),
        "device": device,
        "preset": preset,
        "dtype": dtype,
        "llm_layers": num_layers,
        "vision_layers": vision_num_layers,
        "wall_seconds": {tp: round(r["seconds"], 1) for tp, r in runs.items()},
        "rows": rows,
    }
    click.echo(f"{preset} ({num_layers} LLM + {vision_num_layers} ViT layers), {dtype}, {device}")
    click.echo(
        f"{'case':14} {'TP':>6} {'tokens':>6} {'max|d|':>10} {'mean|d|':>10} {'rel L2':>10} "
        f"{'top-1':>7} {'|logit|max':>10}"
    )
    for row in rows:
        click.echo(
            f"{row['case']:14} {row['tp']:>2} v {row['vs_tp']:<2} {row['tokens']:>6} "
            f"{row['max_abs_diff']:>10.3e} {row['mean_abs_diff']:>10.3e} {row['rel_l2']:>10.3e} "
            f"{row['top1_agreement']:>7.2%} {row['logit_scale']:>10.3f}"
        )
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
