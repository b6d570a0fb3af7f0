"""The inputs both codebases get: token ids and pixel tensors, built once and shared.

Default cases: short text, long text (1k+ tokens), a 1-tile image, a 7-tile image (6 tiles +
thumbnail) and a two-turn conversation. Images are drawn with PIL, never downloaded. A cases FILE
is JSON: a list of {"name", "question", "image": path or null (relative to the file),
"history": [[question, answer], ...]}.

The logits inputs are the ids of OUR chat prompt (tile tags tokenized inside the prompt, one
placeholder per image embedding); Megatron's own prompt construction tokenizes differently
(tags apart, a newline after every <|im_end|>), which `megatron_prompt_ids` reproduces so the
report can show the difference without letting it leak into the logits comparison.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from modeling.processing_nvlm_d import (
    IMG_CONTEXT_TOKEN,
    build_conversation,
    image_placeholder,
    image_to_pixel_values,
    tile_tags,
)

_TEXT = (
    "the model reads a chart with red and blue bars and answers questions about the values shown "
    "in each column while the document lists fields names dates and amounts"
)
WORDS = tuple(_TEXT.split(" "))


@dataclass
class Case:
    name: str
    question: str
    image: Image.Image | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    input_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    num_tiles: int = 0


def draw_picture(width: int, height: int, seed: int) -> Image.Image:
    """Shapes and text on a coloured background: deterministic, non-trivial pixels."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(8, max(9, width // 3)), y0 + rng.randrange(8, max(9, height // 3))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=colour)
    draw.text((width // 10, height // 2), "NVLM 42", fill=(0, 0, 0))
    return image


def default_cases(image_size: int) -> list[Case]:
    rng = random.Random(0)
    long_text = " ".join(rng.choice(WORDS) for _ in range(1100))
    return [
        Case("short text", "Describe a sunny day in one sentence."),
        Case("long text", f"Summarise this text: {long_text}"),
        Case("1-tile image", "What is shown in the image?", draw_picture(image_size, image_size, 1)),
        Case("7-tile image", "Read the text in the image.", draw_picture(3 * image_size, 2 * image_size, 2)),
        Case(
            "two-turn",
            "And what colour is the background?",
            draw_picture(2 * image_size, image_size, 3),
            history=[("<image>\nWhat shapes are there?", "Rectangles and circles.")],
        ),
    ]


def load_cases(path: Path) -> list[Case]:
    path = Path(path)
    cases = []
    for entry in json.loads(path.read_text()):
        image = Image.open(path.parent / entry["image"]).convert("RGB") if entry.get("image") else None
        cases.append(
            Case(entry["name"], entry["question"], image, [tuple(h) for h in entry.get("history", [])])
        )
    return cases


def prepare(cases: list[Case], tokenizer, config) -> list[Case]:
    """Tile the images and tokenize our chat prompt: the shared logits inputs."""
    for case in cases:
        question = case.question
        if case.image is not None:
            case.pixel_values = image_to_pixel_values(
                case.image,
                image_size=config.image_size,
                max_num=config.max_dynamic_patch,
                use_thumbnail=config.use_thumbnail,
            )
            case.num_tiles = case.pixel_values.shape[0]
            if not case.history and "<image>" not in question:
                question = "<image>\n" + question  # as the release's chat() does
        prompt = build_conversation(question, case.history)
        if case.image is not None:  # the one image goes where its marker is (first turn or this one)
            prompt = prompt.replace("<image>", image_placeholder(case.num_tiles, config.num_image_token), 1)
        case.input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    return cases


def megatron_prompt_ids(case: Case, tokenizer, config, system: str = "Answer the questions.") -> list[int]:
    """The ids Megatron-LM's NVLM prompt construction yields for the same turn: chatml with a newline
    after every <|im_end|> (qwen2p0 template), text pieces tokenized apart around the image, the tile
    tags tokenized separately (5 ids each) and one placeholder per image embedding. Equal to the ids
    NVIDIA's own path gives (Megatron-LM NVLM-1.0 and core_r0.19.0, text-only prompts included;
    tests/test_megatron_lm_parity.py checks it against the recorded ones)."""
    turns = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for question, answer in case.history:
        turns.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
    question = case.question
    if case.image is not None and not case.history and "<image>" not in question:
        question = "<image>\n" + question
    turns.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    text = "".join(turns)
    if case.image is None:
        return tokenizer(text, add_special_tokens=False).input_ids
    before, after = text.split("<image>", 1)
    pad = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    ids = tokenizer(before + "<Image>", add_special_tokens=False).input_ids
    for tag in tile_tags(case.num_tiles):
        ids += tokenizer(tag, add_special_tokens=False).input_ids + [pad] * config.num_image_token
    return ids + tokenizer("</Image>" + after, add_special_tokens=False).input_ids


def prompt_difference(ours: list[int], theirs: list[int], tokenizer) -> dict:
    """Where two id sequences first differ, with the differing spans decoded."""
    first = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    same = ours == theirs

    def span(ids):
        text = tokenizer.decode(ids[first : first + 12])
        return text.replace(IMG_CONTEXT_TOKEN, "")

    return {
        "identical": same,
        "ours_tokens": len(ours),
        "megatron_tokens": len(theirs),
        "first_difference": None if same else first,
        "ours_from_there": None if same else span(ours),
        "megatron_from_there": None if same else span(theirs),
    }
