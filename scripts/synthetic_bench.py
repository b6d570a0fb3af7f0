"""A synthetic benchmark suite drawn with PIL: five families that mirror the metrics NVLM reports.

| family            | task                                               | metric  |
|-------------------|----------------------------------------------------|---------|
| `ocr`             | read a rendered word or number                     | exact   |
| `chart`           | the value of a labelled bar (gridlines every 10)   | relaxed |
| `document`        | the value of a key in a small key/value form       | anls    |
| `multiple-choice` | colour, shape or count of shapes, lettered options | mc      |
| `vqa`             | yes/no and counting, ten reference answers each    | vqa     |

Images have several aspect ratios, so that 1-tile and multi-tile inputs (up to 6 tiles +
thumbnail at 64-pixel tiles) all occur. Text is PIL's built-in bitmap font (the same pixels on
every machine, unlike a FreeType font) scaled up with nearest-neighbour.

Everything is a pure function of (split, seed, family, index): the evaluation set
(`scripts/make_synthetic_bench.py`) and the training stream (`scripts/train_tiny_nvlm.py`) draw
from disjoint splits of the same generator.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FAMILIES = ("ocr", "chart", "document", "multiple-choice", "vqa")
METRIC = {"ocr": "exact", "chart": "relaxed", "document": "anls", "multiple-choice": "mc", "vqa": "vqa"}

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = (
    "cat", "dog", "sun", "box", "tree", "fish", "bird", "car", "bus", "map",
    "key", "cup", "hat", "pen", "star", "moon", "rain", "ship", "lamp", "door",
)  # fmt: skip
NAMES = ("ana", "bob", "eve", "max", "tom", "lia", "sam", "kim", "ivo", "zoe")
CITIES = ("rome", "oslo", "lima", "bern", "doha", "riga", "nice", "kyiv", "baku", "cork")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_FONT = (
    ImageFont.load_default_imagefont()  # Pillow >= 10.1: the bitmap font even where FreeType exists
    if hasattr(ImageFont, "load_default_imagefont")
    else ImageFont.load_default()
)


@dataclass
class SyntheticItem:
    family: str
    question: str
    answers: list[str]  # the first is the answer a model is trained to give
    image: Image.Image
    options: list[str] | None = None
    target: str = ""  # what training teaches (the option letter for multiple choice)

    @property
    def metric(self) -> str:
        return METRIC[self.family]

    def __post_init__(self):
        self.target = self.target or self.answers[0]


# -- drawing --------------------------------------------------------------------------------------


def _light(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(200, 256) for _ in range(3))


def _dark(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(0, 90) for _ in range(3))


def text_size(text: str, scale: int) -> tuple[int, int]:
    left, top, right, bottom = _FONT.getbbox(text)
    return right * scale, bottom * scale


def draw_text(image: Image.Image, xy: tuple[int, int], text: str, fill, scale: int = 2) -> None:
    """Bitmap-font text, `scale` times enlarged (nearest neighbour: crisp, machine-independent)."""
    width, height = text_size(text, 1)
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=_FONT)
    mask = mask.resize((width * scale, height * scale), Image.NEAREST)
    image.paste(Image.new("RGB", mask.size, fill), xy, mask)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _cells(width: int, height: int, size: int = 32) -> list[tuple[int, int]]:
    return [(x, y) for y in range(0, height, size) for x in range(0, width, size)]


def _place_shapes(rng, image, shapes: list[tuple[str, str]]) -> None:
    """Each (shape, colour) in its own 32-pixel cell, 16 to 26 pixels across, jittered."""
    draw = ImageDraw.Draw(image)
    cells = rng.sample(_cells(*image.size), len(shapes))
    for (shape, colour), (cx, cy) in zip(shapes, cells):
        size = rng.randrange(16, 27)
        x0, y0 = cx + rng.randrange(0, 32 - size + 1), cy + rng.randrange(0, 32 - size + 1)
        draw_shape(draw, shape, (x0, y0, x0 + size - 1, y0 + size - 1), COLOURS[colour])


# -- the five families ------------------------------------------------------------------------------


def ocr_item(rng: random.Random) -> SyntheticItem:
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randrange(10, 10000))
    width = rng.choice((64, 128, 192))
    image = Image.new("RGB", (width, 64), _light(rng))
    w, h = text_size(text, 2)
    draw_text(image, (rng.randrange(0, width - w + 1), rng.randrange(0, 64 - h + 1)), text, _dark(rng))
    question = rng.choice(("What is written in the image?", "Read the text in the image."))
    return SyntheticItem("ocr", question, [text], image)


def chart_item(rng: random.Random) -> SyntheticItem:
    """Bars over gridlines at 0, 10, ... 100 (one pixel per unit), letters under the bars."""
    labels = "ABCD"[: rng.choice((3, 4))]
    values = [10 * rng.randrange(1, 10) for _ in labels]
    width = rng.choice((128, 192))
    image = Image.new("RGB", (width, 128), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    base = 112  # y of value 0
    for value in range(0, 101, 10):
        draw.line((0, base - value, width - 1, base - value), fill=(200, 200, 200))
    slot = width // len(labels)
    colour = COLOURS[rng.choice(tuple(COLOURS))]
    for k, (label, value) in enumerate(zip(labels, values)):
        x0 = k * slot + slot // 4
        draw.rectangle((x0, base - value, x0 + slot // 2 - 1, base), fill=colour)
        draw_text(image, (x0 + slot // 4 - 3, base + 2), label, (0, 0, 0), scale=1)
    asked = rng.randrange(len(labels))
    question = f"What is the value of bar {labels[asked]}?"
    return SyntheticItem("chart", question, [str(values[asked])], image)


_FIELDS = {
    "name": lambda rng: rng.choice(NAMES),
    "city": lambda rng: rng.choice(CITIES),
    "code": lambda rng: str(rng.randrange(100, 1000)),
    "year": lambda rng: str(rng.randrange(1950, 2030)),
    "room": lambda rng: rng.choice("abcd") + str(rng.randrange(1, 100)),
}


def document_item(rng: random.Random) -> SyntheticItem:
    keys = rng.sample(tuple(_FIELDS), 3)
    values = [_FIELDS[key](rng) for key in keys]
    image = Image.new("RGB", (128, 128), _light(rng))
    ink = _dark(rng)
    for row, (key, value) in enumerate(zip(keys, values)):
        draw_text(image, (rng.randrange(0, 12), 6 + 40 * row + rng.randrange(0, 8)), f"{key}: {value}", ink)
    asked = rng.randrange(3)
    question = rng.choice(("What is the {} in the form?", "What is the {}?")).format(keys[asked])
    return SyntheticItem("document", question, [values[asked]], image)


def _lettered(rng, correct: str, pool) -> tuple[list[str], str]:
    options = [correct, *rng.sample([p for p in pool if p != correct], 3)]
    rng.shuffle(options)
    return options, "ABCD"[options.index(correct)]


def multiple_choice_item(rng: random.Random) -> SyntheticItem:
    kind = rng.choice(("colour", "shape", "count"))
    if kind == "count":
        count, shape = rng.randrange(1, 6), rng.choice(SHAPES)
        image = Image.new("RGB", (128, 64), _light(rng))
        _place_shapes(rng, image, [(shape, rng.choice(tuple(COLOURS))) for _ in range(count)])
        prompt, correct, pool = f"How many {shape}s are in the image?", str(count), "123456"
    else:
        shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        image = Image.new("RGB", (64, 64), _light(rng))
        _place_shapes(rng, image, [(shape, colour)])
        if kind == "colour":
            prompt, correct, pool = "What colour is the shape?", colour, tuple(COLOURS)
        else:
            prompt, correct, pool = "Which shape is shown?", shape, (*SHAPES, "star", "heart")
    options, letter = _lettered(rng, correct, pool)
    lines = "\n".join(f"{'ABCD'[k]}. {option}" for k, option in enumerate(options))
    question = f"{prompt}\n{lines}\n{MC_INSTRUCTION}"
    return SyntheticItem("multiple-choice", question, [letter], image, options=options)


def _annotators(rng: random.Random, answer: str, alternatives: list[str]) -> list[str]:
    """Ten human answers, VQAv2 style: mostly the truth, one or two annotators disagreeing."""
    wrong = rng.choice((0, 1, 2))
    return [answer] * (10 - wrong) + [rng.choice(alternatives) for _ in range(wrong)]


def vqa_item(rng: random.Random) -> SyntheticItem:
    image = Image.new("RGB", rng.choice(((64, 64), (128, 64))), _light(rng))
    capacity = len(_cells(*image.size))
    if rng.random() < 0.5:  # yes / no
        shapes = [(rng.choice(SHAPES), rng.choice(tuple(COLOURS))) for _ in range(rng.randrange(1, capacity))]
        shape, colour = (
            rng.choice(shapes) if rng.random() < 0.5 else (rng.choice(SHAPES), rng.choice(tuple(COLOURS)))
        )
        answer = "yes" if (shape, colour) in shapes else "no"
        question = f"Is there a {colour} {shape}?"
        alternatives = ["no" if answer == "yes" else "yes"]
    else:  # counting among distractors of other shapes
        shape = rng.choice(SHAPES)
        count = rng.randrange(1, capacity)
        others = [s for s in SHAPES if s != shape]
        shapes = [(shape, rng.choice(tuple(COLOURS))) for _ in range(count)]
        shapes += [
            (rng.choice(others), rng.choice(tuple(COLOURS)))
            for _ in range(rng.randrange(0, capacity - count + 1))
        ]
        answer = str(count)
        question = f"How many {shape}s are there?"
        alternatives = [str(max(0, count - 1)), str(count + 1)]
    rng.shuffle(shapes)
    _place_shapes(rng, image, shapes)
    return SyntheticItem("vqa", question, _annotators(rng, answer, alternatives), image)


MAKERS = {
    "ocr": ocr_item,
    "chart": chart_item,
    "document": document_item,
    "multiple-choice": multiple_choice_item,
    "vqa": vqa_item,
}


def make_item(split: str, seed: int, family: str, index: int) -> SyntheticItem:
    """Item `index` of `family` in a split: the same item on every machine (string seeds are hashed
    with SHA-512 by `random.Random`, independent of PYTHONHASHSEED)."""
    return MAKERS[family](random.Random(f"{split}/{seed}/{family}/{index}"))


# -- the evaluation set ------------------------------------------------------------------------------


@dataclass
class BenchFiles:
    jsonl: Path
    images: list[Path] = field(default_factory=list)


def write_bench(out: Path, *, seed: int, per_family: int, split: str = "eval") -> BenchFiles:
    """`out/bench.jsonl` (the format `parity-check bench` reads) and `out/images/*.png`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = BenchFiles(out / "bench.jsonl")
    lines = []
    for family in FAMILIES:
        for index in range(per_family):
            item = make_item(split, seed, family, index)
            name = f"images/{family}-{index:04d}.png"
            item.image.save(out / name, optimize=True)
            files.images.append(out / name)
            entry = {
                "id": f"{family}-{index:04d}",
                "benchmark": family,
                "image": name,
                "question": item.question,
                "answers": item.answers,
                "metric": item.metric,
            }
            if item.options is not None:
                entry["options"] = item.options
            lines.append(json.dumps(entry))
    files.jsonl.write_text("\n".join(lines) + "\n")
    return files
