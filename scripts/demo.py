"""`make demo`: the main job of nvlm-port on an example checkpoint.

1. `scripts/make_megatron_checkpoint.py` builds the tiny NVLM-D with Megatron-Core at TP=2 (two gloo
   ranks on the CPU) and saves a legacy Megatron-LM checkpoint (seeded random weights);
2. `convert-checkpoint megatron-to-hf` converts it, with the shipped tiny tokenizer;
3. the folder is loaded with `AutoModel.from_pretrained(..., trust_remote_code=True)` and chats about
   a generated picture. Random weights answer noise: the point is that the whole path runs. (A
   Megatron-trained checkpoint to ship with the demo is future work.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modeling.processing_nvlm_d import image_to_pixel_values  # noqa: E402


def example_image() -> Image.Image:
    """A 2:1 picture (two tiles + thumbnail at the tiny preset's 64-pixel tiles)."""
    image = Image.new("RGB", (128, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 56, 56), fill="red")
    draw.ellipse((72, 8, 120, 56), fill="blue")
    return image


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=REPO / "demo-output",
    show_default=True,
    help="Folder the demo writes into (replaced).",
)
@click.option("--seed", default=0, show_default=True)
def main(out: Path, seed: int) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    megatron_dir, hf_dir = out / "megatron-tiny-tp2", out / "tiny-hf"
    tokenizer_dir = REPO / "tests" / "fixtures" / "tiny-tokenizer"
    steps = [
        (
            "1. Megatron-Core: tiny NVLM-D at TP=2, saved as a legacy checkpoint",
            [
                sys.executable,
                str(REPO / "scripts" / "make_megatron_checkpoint.py"),
                "--preset",
                "tiny",
                "--tp",
                "2",
                "--seed",
                str(seed),
                str(megatron_dir),
            ],
        ),
        (
            "2. convert-checkpoint megatron-to-hf",
            [
                sys.executable,
                "-m",
                "converter.cli",
                "megatron-to-hf",
                str(megatron_dir),
                str(hf_dir),
                "--tokenizer",
                str(tokenizer_dir),
            ],
        ),
    ]
    for title, command in steps:
        click.echo(f"{title}\n   $ {' '.join(Path(c).name if c.startswith('/') else c for c in command)}")
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if run.returncode:
            raise click.ClickException(run.stderr[-2000:])
        click.echo("   " + run.stdout.strip().replace("\n", "\n   "))

    click.echo(f"3. loading {hf_dir} with AutoModel.from_pretrained(..., trust_remote_code=True)")
    model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    image = example_image()
    image.save(out / "example.png")
    pixels = image_to_pixel_values(image, image_size=model.config.image_size, max_num=6)
    click.echo(f"4. chatting about {out / 'example.png'} ({pixels.shape[0]} tiles incl. thumbnail)")
    greedy = dict(max_new_tokens=12, do_sample=False)
    answer, history = model.chat(
        tokenizer, pixels, "What shapes are in the picture?", greedy, return_history=True
    )
    click.echo(f"   Q: What shapes are in the picture?\n   A: {answer!r}")
    answer = model.chat(tokenizer, None, "Which one is red?", greedy, history=history)
    click.echo(f"   Q: Which one is red?\n   A: {answer!r}")
    click.echo(
        "(seeded random weights: the answers are noise; the logits match Megatron's, "
        "see tests/test_conversion.py)"
    )


if __name__ == "__main__":
    main()
