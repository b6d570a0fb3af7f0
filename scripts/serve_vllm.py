"""Serve a converted NVLM-D folder with vLLM and compare its greedy output with our HF class's.

    python scripts/serve_vllm.py FOLDER [--image PATH] [--max-new-tokens 32] [--tensor-parallel-size N]

Runs where vLLM is installed (`pip install vllm`, a CUDA GPU): vLLM's offline engine
(`vllm.LLM`, trust_remote_code, the folder's chat template) answers a text prompt and an image
prompt greedily; the folder's own remote code (`AutoModel` / `AutoProcessor` with
trust_remote_code=True, no nvlm-port import) answers the same prompts; the script prints a table
of both answers and whether the new token ids are equal, and exits 1 if any differ.

Both sides get the same prompt text, with the image as vLLM's "<image>" placeholder, which vLLM
expands itself (tile tags, 256 `<|vision_pad|>` per tile) and our processor expands the same way
(tests/test_vllm_readiness.py checks that expansion, the config fields and the weight names vLLM
reads, without vLLM). Both run in the folder's dtype (vLLM's "auto" would cast float32 weights down).

Not run yet (README, "Serving with vLLM"): this project's GPU machine has no vLLM and cannot
download it, and the wheel is far larger than what can be carried there.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import click

TEXT_PROMPT = "Write one sentence about the sea."
IMAGE_QUESTION = "Describe the image."


def drawn_image():
    """A picture that needs several tiles (wide), drawn with PIL: no file or download needed."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1344, 448), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 60, 390, 390), fill="red")
    draw.rectangle((520, 90, 820, 360), fill="blue")
    draw.polygon([(1000, 380), (1150, 70), (1300, 380)], fill="green")
    return image


def prompts(processor, image):
    """(name, prompt text with "<image>" placeholders, image or None), through the folder's template."""

    def render(content):
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    image_parts = [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]
    return [("text", render(TEXT_PROMPT), None), ("image", render(image_parts), image)]


def hf_answers(folder: Path, cases, dtype: str, max_new_tokens: int) -> list[list[int]]:
    """Greedy new token ids of the folder's own remote code (AutoModel, trust_remote_code=True)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=getattr(torch, dtype))
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    answers = []
    for _name, prompt, image in cases:
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
        pixels = inputs.get("pixel_values")
        with torch.no_grad():
            new = model.generate(
                pixel_values=None if pixels is None else pixels.to(model.dtype),
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        answers.append(new[0].tolist())
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers


def vllm_answers(
    folder: Path, cases, dtype: str, max_new_tokens: int, tp: int, max_model_len, memory
) -> list:
    """Greedy new token ids of vLLM's offline engine on the same prompt texts and images."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder),
        trust_remote_code=True,
        dtype=dtype,
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        gpu_memory_utilization=memory,
        limit_mm_per_prompt={"image": 1},
        enforce_eager=True,
    )
    requests = [
        {"prompt": prompt, **({"multi_modal_data": {"image": image}} if image is not None else {})}
        for _name, prompt, image in cases
    ]
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    return [list(output.outputs[0].token_ids) for output in outputs]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--image", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Default: drawn.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--tensor-parallel-size", "tp", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--max-model-len", type=click.IntRange(min=1), help="Default: what vLLM derives from config.json."
)
@click.option(
    "--gpu-memory-utilization", "memory", type=click.FloatRange(0.05, 0.95), default=0.6, show_default=True
)
def main(folder, image, max_new_tokens, tp, max_model_len, memory):
    try:
        import vllm
    except ImportError:
        click.echo("error: vLLM is not installed here (pip install vllm; it needs a CUDA GPU)", err=True)
        sys.exit(2)
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    dtype = config.get("torch_dtype") or "bfloat16"
    picture = Image.open(image).convert("RGB") if image else drawn_image()
    cases = prompts(AutoProcessor.from_pretrained(folder, trust_remote_code=True), picture)
    theirs = vllm_answers(folder, cases, dtype, max_new_tokens, tp, max_model_len, memory)
    gc.collect()
    ours = hf_answers(folder, cases, dtype, max_new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    click.echo(f"vLLM {vllm.__version__}, {folder}, {dtype}, greedy, {max_new_tokens} new tokens")
    click.echo("| prompt | equal ids | first difference | vLLM | HF (remote code) |\n|---|---|---|---|---|")
    same = True
    for (name, _prompt, _image), a, b in zip(cases, theirs, ours):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        same &= first is None
        texts = [
            tokenizer.decode(ids, skip_special_tokens=True).replace("|", "\\|").replace("\n", " ")
            for ids in (a, b)
        ]
        click.echo(
            f"| {name} | {first is None} | {'-' if first is None else first} | {texts[0]!r} | {texts[1]!r} |"
        )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
