"""Build the tiny Qwen2.5-style tokenizer used by the test suite (no download, deterministic).

The published NVLM-D-72B model uses the Qwen2.5 tokenizer: byte-level BPE behind Qwen2's
GPT-4-style split regex, an NFC normaliser, 151643 regular entries followed by 22 added tokens
(``<|endoftext|>`` ... ``<|file_sep|>``), 151665 entries in all, while the model's embedding has
152064 rows. This script builds a structurally identical tokenizer with 1000 entries (978 regular
+ the same 22 added tokens, in the same order, ids 978..999) for a model whose embedding has 1024
rows. It is trained with ``tokenizers.trainers.BpeTrainer`` on an English question/answer corpus
generated in this file from word lists and a fixed random seed. The NVLM prompt pieces
(``<Image>``, ``</Image>``, ``<tile_1>`` .. ``<tile_6>``, ``<tile_global_thumbnail>``) are plain
text in that corpus, as they are for the real tokenizer, so BPE merges across their boundaries.

Written to OUT_DIR: ``tokenizer.json`` (fast path), ``vocab.json`` + ``merges.txt`` (the files a
tokenizer can be rebuilt from without ``tokenizer.json``) and ``tokenizer_config.json``.
Running it twice gives byte-identical files.

Rerun with ``make tokenizer``, which runs::

    python scripts/make_tiny_tokenizer.py tests/fixtures/tiny-tokenizer
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import click
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers.models import BPE

TOTAL_ENTRIES = 1000
SEED = 20240917

# Qwen2's pre-tokenisation regex (the same one transformers' Qwen2Tokenizer uses).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens of Qwen2.5, in the order (and with the "special" flag) of the real tokenizer.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
REGULAR_ENTRIES = TOTAL_ENTRIES - len(ADDED_TOKENS)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 32768

# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def _words(text: str, sep: str | None = None) -> list[str]:
    return [w.strip() for w in text.split(sep)]


COLOURS = _words(
    "red green blue yellow orange purple pink brown black white grey gray cyan magenta violet "
    "indigo teal maroon navy olive gold silver beige turquoise crimson lavender"
)
SHAPES = _words(
    "circle square triangle rectangle pentagon hexagon octagon star diamond oval ellipse heart "
    "arrow cross cube sphere cone cylinder pyramid line dot"
)
NUMBER_WORDS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred thousand million"
)
CHARTS = _words(
    "bar chart|line chart|pie chart|scatter plot|histogram|table|diagram|graph|infographic|map|"
    "flowchart|area chart|stacked bar chart|heat map",
    sep="|",
)
CHART_PARTS = _words("legend|title|x-axis|y-axis|axis label|caption|footnote|grid|scale|source", "|")
LABELS = _words(
    "Sales|Revenue|Profit|Costs|Exports|Imports|Population|Temperature|Rainfall|Students|Visitors|"
    "Employees|Customers|Orders|Downloads|Users|Energy|Water|Food|Transport|Housing|Health|Education",
    sep="|",
)
YEARS = [str(y) for y in range(1990, 2025)]
MONTHS = _words("January February March April May June July August September October November December")
COUNTRIES = _words(
    "France Germany Italy Spain Japan China India Brazil Canada Mexico Kenya Egypt Norway Sweden "
    "Poland Chile Peru Australia Korea Vietnam"
)
FORM_FIELDS = _words(
    "name|first name|last name|date of birth|address|city|postal code|phone number|email address|"
    "signature|total amount|invoice number|account number|date|company|department|occupation|"
    "nationality|gender|reference number|due date|tax|subtotal|quantity|unit price|description",
    sep="|",
)
FORM_KINDS = _words("form|invoice|receipt|application|certificate|letter|report|contract|ticket|menu", "|")
PEOPLE = _words("John Smith|Mary Jones|Ana Garcia|Li Wei|Amir Khan|Sara Lopez|Tom Brown|Yuki Sato", "|")
OBJECTS = _words(
    "cat|dog|car|bus|tree|house|person|bicycle|bird|boat|chair|table|book|cup|phone|clock|lamp|"
    "window|door|flower|apple|banana|bottle|umbrella|train|plane|horse|cow|sign|road",
    sep="|",
)
POSITIONS = _words(
    "left|right|top|bottom|centre|center|middle|top left|bottom right|foreground|background",
    sep="|",
)
SIZES = _words("small|large|big|tiny|tall|short|wide|narrow|long|thin|thick", "|")
LETTERS = ["A", "B", "C", "D"]
TRENDS = _words("increase|decrease|remain stable|rise|fall|double|peak|drop", "|")


def _number(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randrange(0, 100))
    if kind == 1:
        return str(rng.randrange(100, 100000))
    if kind == 2:
        return f"{rng.randrange(0, 1000)}.{rng.randrange(0, 100):02d}"
    return f"{rng.randrange(0, 101)}%"


def _image_prefix(rng: random.Random) -> str:
    """The NVLM-D image block as plain text, with the image tokens left out."""
    tiles = rng.randrange(1, 7)
    if tiles == 1:
        tags = ["<tile_global_thumbnail>"]
    else:
        tags = [f"<tile_{i}>" for i in range(1, tiles + 1)] + ["<tile_global_thumbnail>"]
    return "<Image>" + "".join(tags) + "</Image>\n"


def _question(rng: random.Random) -> tuple[str, str]:
    c = rng.choice
    kind = rng.randrange(14)
    if kind == 0:
        label = c(LABELS)
        return (f"What is the value of the bar labelled {label} in {c(YEARS)}?", _number(rng))
    if kind == 1:
        shape = c(SHAPES)
        colour = c(COLOURS)
        return (f"What colour is the {shape}?", f"The {shape} is {colour}.")
    if kind == 2:
        return (f"How many {c(SHAPES)}s are there in the image?", c([str(rng.randrange(20)), *NUMBER_WORDS]))
    if kind == 3:
        colour, shape = c(COLOURS), c(SHAPES)
        return (f"Is the {shape} {colour}? Answer yes or no.", c(["yes", "no", "Yes", "No"]))
    if kind == 4:
        options = rng.sample(COLOURS, 4)
        choices = " ".join(f"{letter}. {opt}" for letter, opt in zip(LETTERS, options))
        return (
            f"Which colour is the {c(SHAPES)} on the {c(POSITIONS)}?\n{choices}\n"
            "Answer with the option's letter from the given choices directly.",
            c(LETTERS),
        )
    if kind == 5:
        field, form = c(FORM_FIELDS), c(FORM_KINDS)
        return (f"What is the {field} written on the {form}?", c([c(PEOPLE), _number(rng), c(MONTHS)]))
    if kind == 6:
        chart, part = c(CHARTS), c(CHART_PARTS)
        by = c(["year", "month", "country"])
        return (f"What does the {part} of the {chart} say?", f"{c(LABELS)} by {by}")
    if kind == 7:
        a, b = rng.sample(COUNTRIES, 2)
        return (
            f"Which country has the highest {c(LABELS).lower()} in the {c(CHARTS)}, {a} or {b}?",
            c([a, b]),
        )
    if kind == 8:
        label = c(LABELS)
        y1, y2 = sorted(rng.sample(YEARS, 2))
        return (
            f"Did {label.lower()} {c(TRENDS)} between {y1} and {y2}?",
            f"{c(['Yes', 'No'])}, it went from {_number(rng)} to {_number(rng)}.",
        )
    if kind == 9:
        obj = c(OBJECTS)
        return (f"Where is the {c(SIZES)} {obj} in the picture?", f"The {obj} is in the {c(POSITIONS)}.")
    if kind == 10:
        answer = f"A {c(SIZES)} {c(COLOURS)} {c(OBJECTS)} next to a {c(OBJECTS)}."
        return ("Describe the image briefly.", answer)
    if kind == 11:
        return (
            f"What is the sum of the values for {c(LABELS)} in {c(MONTHS)} and {c(MONTHS)}?",
            _number(rng),
        )
    if kind == 12:
        letters = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randrange(2, 5)))
        return (f"What word is written on the {c(OBJECTS)}?", c([letters, c(NUMBER_WORDS).upper()]))
    return (
        f"What is the difference between the largest and smallest {c(SHAPES)} values?",
        f"The difference is {_number(rng)}.",
    )


def build_corpus(seed: int = SEED, lines: int = 800) -> list[str]:
    """A deterministic question/answer corpus; every call with the same seed gives the same lines."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(lines):
        question, answer = _question(rng)
        roll = rng.random()
        if roll < 0.35:
            out.append(f"{_image_prefix(rng)}{question}")
            out.append(answer)
        elif roll < 0.55:
            out.append(f"Answer the questions.\n{_image_prefix(rng)}{question}\n{answer}")
        else:
            out.append(f"Question: {question} Answer: {answer}")
    # A few fixed lines so the word lists themselves are always present.
    for words in (COLOURS, SHAPES, NUMBER_WORDS, LABELS, MONTHS, COUNTRIES, OBJECTS):
        out.append(", ".join(words) + ".")
    out.append(" ".join(str(d) for d in range(10)) + " " + " ".join(LETTERS))
    out.append("Answer the questions.")
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols of the GPT-2 byte-to-unicode table, in the order of Qwen2's ids 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Qwen2's vocab.json starts with the printable symbols ('!' = 0) and then the remapped ones,
    # i.e. the table's insertion order above, not byte order.
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def _configure(tok: Tokenizer) -> None:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()


def _new_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> BPE:
    kwargs = {
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": "",
        "end_of_word_suffix": "",
        "fuse_unk": False,
        "byte_fallback": False,
    }
    if vocab is None:
        return BPE(**kwargs)
    return BPE(vocab=vocab, merges=merges, **kwargs)


def train_merges(corpus: list[str]) -> list[tuple[str, str]]:
    """Train byte-level BPE on ``corpus`` and return its merges, in rank order."""
    tok = Tokenizer(_new_bpe())
    _configure(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=REGULAR_ENTRIES,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    model = json.loads(tok.to_str())["model"]
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((a, b))
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte symbols first (ids 0..255, Qwen2's order), then each merge's result in rank order."""
    vocab: dict[str, int] = {}
    for sym in _byte_alphabet():
        vocab[sym] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def build_tokenizer() -> tuple[Tokenizer, dict[str, int], list[tuple[str, str]]]:
    merges = train_merges(build_corpus())
    vocab = build_vocab(merges)
    if len(vocab) != REGULAR_ENTRIES:
        raise RuntimeError(
            f"trained {len(vocab)} regular entries, wanted {REGULAR_ENTRIES}; enlarge the corpus word lists"
        )
    tok = Tokenizer(_new_bpe(vocab, merges))
    _configure(tok)
    # One call per token keeps the ids in the real file's order whatever the flag.
    for content, special in ADDED_TOKENS:
        added = AddedToken(
            content, lstrip=False, rstrip=False, single_word=False, normalized=False, special=special
        )
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    # The Python binding of decoders.ByteLevel ignores its flags and serialises the GPT-2 defaults
    # (add_prefix_space/trim_offsets/use_regex all true); Qwen2's tokenizer.json has all three false.
    # ByteLevel decoding does not depend on them, but write what the real file says.
    data = json.loads(tok.to_str())
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    tok = Tokenizer.from_str(json.dumps(data))
    if tok.get_vocab_size(with_added_tokens=True) != TOTAL_ENTRIES:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} entries")
    return tok, vocab, merges


def tokenizer_config() -> dict:
    decoder = {
        str(REGULAR_ENTRIES + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t, special in ADDED_TOKENS if special and t != PAD_TOKEN],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(out_dir: Path) -> Tokenizer:
    tok, vocab, merges = build_tokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n",
        "merges.txt": "".join(f"{a} {b}\n" for a, b in merges),
    }
    for name, text in texts.items():
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")
    return tok


@click.command(help="Build the tiny Qwen2.5-style tokenizer into OUT_DIR (deterministic, offline).")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def main(out_dir: Path) -> None:
    tok = write_tokenizer(out_dir)
    ids = {t: tok.token_to_id(t) for t in (EOS_TOKEN, PAD_TOKEN, "<|vision_pad|>")}
    click.echo(
        f"wrote {out_dir}: {tok.get_vocab_size(with_added_tokens=True)} entries "
        f"({REGULAR_ENTRIES} regular + {len(ADDED_TOKENS)} added, ids {REGULAR_ENTRIES}..{TOTAL_ENTRIES - 1})"
    )
    click.echo(", ".join(f"{t} = {i}" for t, i in ids.items()))


if __name__ == "__main__":
    main()
