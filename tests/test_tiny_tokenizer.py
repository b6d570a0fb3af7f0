"""The shipped tiny tokenizer (tests/fixtures/tiny-tokenizer) mirrors the Qwen2.5 tokenizer's structure.

Real Qwen2.5: 151643 regular entries + 22 added tokens = 151665 (ids 0..151664), eos ``<|im_end|>``
151645, pad ``<|endoftext|>`` 151643, image placeholder ``<|vision_pad|>`` 151654. The tiny one:
978 regular + the same 22 added tokens in the same order = 1000 (ids 0..999).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-tokenizer"
SCRIPT = ROOT / "scripts" / "make_tiny_tokenizer.py"
FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

TOTAL = 1000
# Qwen2.5's added tokens in id order: (content, special flag).
ADDED = [
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
FIRST_ADDED = TOTAL - len(ADDED)  # 978, like 151643 in the real tokenizer
PAD_ID = FIRST_ADDED  # <|endoftext|>
EOS_ID = FIRST_ADDED + 2  # <|im_end|>
VISION_PAD_ID = FIRST_ADDED + 11  # <|vision_pad|>


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(FIXTURE))


def test_fixture_files_present():
    for name in FILES:
        assert (FIXTURE / name).is_file(), name


def test_total_length(tok):
    assert len(tok) == TOTAL
    assert sorted(tok.get_vocab().values()) == list(range(TOTAL))


def test_added_tokens_are_single_ids_at_the_top(tok):
    for offset, (content, _special) in enumerate(ADDED):
        ids = tok(content, add_special_tokens=False)["input_ids"]
        assert ids == [FIRST_ADDED + offset], content
        assert tok.convert_ids_to_tokens(FIRST_ADDED + offset) == content
    decoder = tok.added_tokens_decoder
    assert sorted(decoder) == list(range(FIRST_ADDED, TOTAL))
    assert [(decoder[i].content, decoder[i].special) for i in sorted(decoder)] == ADDED


def test_eos_pad_bos(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == EOS_ID == 980
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id == PAD_ID == 978
    assert tok.bos_token is None
    assert tok.convert_tokens_to_ids("<|vision_pad|>") == VISION_PAD_ID == 989
    assert tok.model_max_length == 32768


def test_vision_pad_run(tok):
    ids = tok("<|vision_pad|>" * 16, add_special_tokens=False)["input_ids"]
    assert ids == [VISION_PAD_ID] * 16


def test_round_trip(tok):
    text = "What is the value of the bar labelled Sales in 2019? Answer: 42.5% (not 7), naïve café."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert all(i < FIRST_ADDED for i in ids)
    assert tok.decode(ids) == text


def test_nvlm_prompt_tags_are_plain_text(tok):
    """<Image>, <tile_k> are plain text: BPE merges across their boundaries, as in the real tokenizer."""
    prompt = (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<Image><tile_1>"
        + "<|vision_pad|>" * 4
        + "<tile_global_thumbnail>"
        + "<|vision_pad|>" * 4
        + "</Image>\nWhat colour is the circle?<|im_end|><|im_start|>assistant\n"
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert ids.count(VISION_PAD_ID) == 8
    assert pieces[pieces.index("<|im_start|>", 1) + 4 : pieces.index("<|im_start|>", 1) + 7] == [
        "<Image",
        "><",
        "tile",
    ]
    assert tok.decode(ids) == prompt


def test_vocab_and_merges_alone_give_the_same_tokenizer(tok, tmp_path):
    """Without tokenizer.json the tokenizer is rebuilt from vocab.json + merges.txt and must agree."""
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    other = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(other) == TOTAL
    text = "<|im_start|>user\n<Image><tile_global_thumbnail><|vision_pad|></Image>\nIs it red? yes<|im_end|>"
    assert other(text)["input_ids"] == tok(text)["input_ids"]


def test_fixture_matches_fresh_build(tmp_path):
    out = tmp_path / "rebuilt"
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, capture_output=True, cwd=ROOT)
    for name in FILES:
        assert (out / name).read_bytes() == (FIXTURE / name).read_bytes(), name
