"""`make demo`: the main job of nvlm-port on the shipped example.

Today (before the conversion engine lands) it builds the tiny NVLM-D preset with random weights,
writes it as a Hugging Face folder with the shipped tiny tokenizer, loads that folder back through
`AutoModel.from_pretrained(..., trust_remote_code=True)` and chats with it about a generated image.
Random weights answer gibberish: the point is that the whole Hugging Face path runs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click
import torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modeling import NVLM_D_Model, get_config  # noqa: E402
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
    hf_dir = out / "tiny-hf"
    torch.manual_seed(seed)
    click.echo("1. building the tiny NVLM-D preset (random weights) and saving it as a Hugging Face folder")
    NVLM_D_Model(get_config("tiny")).save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(REPO / "tests/fixtures/tiny-tokenizer").save_pretrained(hf_dir)

    click.echo(f"2. loading {hf_dir} with AutoModel.from_pretrained(..., trust_remote_code=True)")
    model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    image = example_image()
    image.save(out / "example.png")
    pixels = image_to_pixel_values(image, image_size=model.config.image_size, max_num=6)
    click.echo(f"3. chatting about {out / 'example.png'} ({pixels.shape[0]} tiles incl. thumbnail)")
    greedy = dict(max_new_tokens=12, do_sample=False)
    answer, history = model.chat(
        tokenizer, pixels, "What shapes are in the picture?", greedy, return_history=True
    )
    click.echo(f"   Q: What shapes are in the picture?\n   A: {answer!r}")
    answer = model.chat(tokenizer, None, "Which one is red?", greedy, history=history)
    click.echo(f"   Q: Which one is red?\n   A: {answer!r}")
    click.echo(
        "(random weights: the answers are noise. Conversion of a Megatron checkpoint is not "
        "implemented yet; once it is, this demo converts the shipped checkpoint instead.)"
    )


if __name__ == "__main__":
    main()
