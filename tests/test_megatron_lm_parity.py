"""Our Megatron-Core builder and our HF class against NVIDIA's own NVLM model code.

NVIDIA's side (Megatron-LM tag NVLM-1.0: examples/multimodal `model_provider`, nvlm/internvit.py,
`load_checkpoint`, its MultimodalTokenizer's qwen2p0 prompt with the tile tags applied inside the
model; Transformer Engine emulated; 8 gloo ranks) ran on tests/fixtures/nvlm10-recipe/sft-tp8 through
scripts/fixtures/nvlm10_recipe_parity.py, which recorded it in megatron-lm-parity/ (its README has
the command and every figure). CI has no Megatron-LM checkout (megatron-core wheels ship only
megatron/core), so ours is checked against those recorded values: the logits within 1e-5 at the
recorded positions (sum and norm at every position), every layer output, the same greedy tokens,
and our emulation of NVIDIA's prompt path giving NVIDIA's ids. With NVLM_MEGATRON_LM=/path/to/a
checkout, `parity-check logits --megatron-lm` runs NVIDIA's code live.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import os
import sys

import pytest
import torch
from conftest import REFERENCE, REPO, TINY_TOKENIZER, cli

FIXTURE = REPO / "tests" / "fixtures" / "nvlm10-recipe"
RECORDED = FIXTURE / "megatron-lm-parity"
ATOL = 1e-5  # max |ours - NVIDIA's| on logits and layer outputs, fp32 (measured: README there)
SUM_ATOL = 1e-3  # the sum of 1000 logits, each within 1e-5
NORM_RTOL = 1e-6
# Our builder at TP=8 is 8 gloo processes (their start-up is most of the time): on CI's 2 cores it
# checks one case (the HF class all five): the two-turn one (an image of 2 tiles + thumbnail after a
# turn), with a short continuation. The 7-tile case: the class test here, NVIDIA's model on the GPU
# (docs/results/parity/megatron-lm, TP=1).
BUILDER_CASES = ("two-turn",)
BUILDER_STEPS = 8

sys.path.insert(0, str(REPO / "scripts" / "fixtures"))
from nvlm10_recipe import recorded as recorded_mod  # noqa: E402

pytestmark = pytest.mark.skipif(not RECORDED.exists(), reason=f"{RECORDED} is absent")


@pytest.fixture(scope="module")
def record():
    return recorded_mod.load(RECORDED / "nvidia.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nvlm10-parity") / "hf"
    code, output = cli("megatron-to-hf", FIXTURE / "sft-tp8", folder, "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    return folder


@pytest.fixture(scope="module")
def hf_side(converted):
    from transformers import AutoTokenizer

    from modeling import NVLM_D_Config

    return NVLM_D_Config.from_pretrained(converted), AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def cases(record, hf_side):
    """The default cases as recorded: the same pixel tensors, and NVIDIA's ids as everyone's input."""
    from converter.parity import cases as cases_mod

    config, tokenizer = hf_side
    recorded_cases, metadata = record
    prepared = cases_mod.prepare(cases_mod.default_cases(config.image_size), tokenizer, config)
    assert [c.name for c in prepared] == metadata["cases"]
    for case, kept, sha in zip(prepared, recorded_cases, metadata["pixels_sha256"]):
        assert recorded_mod.pixels_sha256(case.pixel_values) == sha, (
            f"{case.name}: other pixels than recorded"
        )
        case.chat_ids = case.input_ids[0].tolist()
        case.input_ids = kept["ids"].unsqueeze(0)
    return prepared


def _assert_close(name: str, found: dict, generated, kept: dict) -> None:
    assert found["logits_max_abs_diff"] <= ATOL, (name, found)
    assert found["sum_max_abs_diff"] <= SUM_ATOL and found["norm_max_rel_diff"] <= NORM_RTOL, (name, found)
    assert found["argmax_same"], name
    for module, error in found["layers"].items():
        assert error is not None, f"{name}: no {module} output"
        assert error["max_abs_diff"] <= ATOL and error["norm_max_rel_diff"] <= NORM_RTOL, (
            name,
            module,
            error,
        )
    assert generated == kept["generated"][: len(generated)].tolist(), name


@pytest.fixture(scope="module")
def hf_model(converted):
    from converter.parity import logits as parity

    return parity.load_hf(converted, torch.float32, "cpu")


@pytest.mark.parametrize("k", range(5))
def test_our_class_gives_nvidias_model(hf_model, cases, record, hf_side, k):
    """NVLM_D_Model on the converted folder vs NVIDIA's recorded model: logits, every ViT layer, the
    projector and every LLM layer within 1e-5, the same 32 greedy tokens (KV-cached generate())."""
    from converter.parity import logits as parity

    config, tokenizer = hf_side
    case, kept = cases[k], record[0][k]
    run = parity.run_hf(hf_model, case, record[1]["true_vocab"])
    steps = len(kept["generated"])
    generated = parity.generate_hf(hf_model, case, steps, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    _assert_close(case.name, recorded_mod.compare(kept, run.logits, run.layers), generated, kept)


@pytest.fixture(scope="module")
def builder_run(cases, hf_side, record):
    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.session import ForwardJob, ModelSource, forward_rank

    config, tokenizer = hf_side
    chosen = [c for c in cases if c.name in BUILDER_CASES]
    layout = ParallelLayout(8, 1)
    job = ForwardJob(
        ModelSource(checkpoint=str(FIXTURE / "sft-tp8")),
        layout,
        [{"input_ids": c.input_ids, "pixel_values": c.pixel_values} for c in chosen],
        collect_layers=True,
        image_token_id=config.img_context_token_id,
        generate_tokens=BUILDER_STEPS,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    return dict(
        zip(
            (c.name for c in chosen),
            zip(
                *(
                    run_ranks(forward_rank, layout, job, backend="gloo")[key]
                    for key in ("outputs", "generated")
                )
            ),
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILDER_CASES)
def test_our_builder_gives_nvidias_model(builder_run, record, name):
    """Our Megatron-Core builder at TP=8 (8 gloo ranks) on the same rank files vs NVIDIA's model."""
    k = record[1]["cases"].index(name)
    output, generated = builder_run[name]
    kept = record[0][k]
    _assert_close(name, recorded_mod.compare(kept, output.logits, output.layers), generated, kept)


def _chat_differences(ours: list[int], theirs: list[int], tokenizer) -> set:
    """The edits from chat()'s ids to NVIDIA's, as (ours, theirs) token tuples."""
    matcher = difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False)
    return {
        (
            tuple(tokenizer.convert_ids_to_tokens(ours[i1:i2])),
            tuple(tokenizer.convert_ids_to_tokens(theirs[j1:j2])),
        )
        for op, i1, i2, j1, j2 in matcher.get_opcodes()
        if op != "equal"
    }


# Where chat()'s prompt differs from NVIDIA's (`Ċ` is "\n" in byte-level BPE): the qwen2p0 template's
# newline after every <|im_end|>, and `<Image>` + the first tile tag, merged by chat()'s BPE into
# `><`, tokenized apart by NVIDIA (the tag is embedded inside the model).
KNOWN_DIFFERENCES = {((), ("Ċ",)), (("><",), (">", "<"))}


def test_our_emulation_gives_nvidias_prompt_ids(cases, hf_side):
    """cases.megatron_prompt_ids (what the report shows for our builder's runs) = the ids NVIDIA's own
    prompt path gave, every default case, the text-only ones with their newline after <|im_end|>."""
    from converter.parity import cases as cases_mod

    config, tokenizer = hf_side
    for case in cases:
        theirs = case.input_ids[0].tolist()
        assert cases_mod.megatron_prompt_ids(case, tokenizer, config) == theirs, case.name
        assert _chat_differences(case.chat_ids, theirs, tokenizer) <= KNOWN_DIFFERENCES, case.name
        assert theirs.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == len(case.history) * 2 + 2


def test_our_emulation_with_the_release_tokenizer():
    """The same with the release's tokenizer (151,665 entries) at the release's sizes, against NVIDIA's
    prompt path recorded with it (prompts.json)."""
    if not (REFERENCE / "vocab.json").exists():
        pytest.skip(f"{REFERENCE} is absent: the release's tokenizer files live in ../shared/reference")
    from transformers import AutoTokenizer

    from converter.parity import cases as cases_mod
    from modeling import get_config
    from modeling.megatron.megatron_lm import combined_ids

    recorded = json.loads((RECORDED / "prompts.json").read_text())
    config = get_config("nvlm-d-72b")
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    pad = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    prepared = cases_mod.prepare(cases_mod.default_cases(config.image_size), tokenizer, config)
    for case, kept in zip(prepared, recorded["cases"], strict=True):
        assert (case.name, case.num_tiles) == (kept["name"], kept["num_tiles"])
        ids, mask = combined_ids(
            kept["native_ids"],
            recorded["image_token_id"],
            recorded["tile_tags"],
            case.num_tiles,
            config.num_image_token,
        )
        theirs = [pad if m else t for t, m in zip(ids, mask)]
        assert cases_mod.megatron_prompt_ids(case, tokenizer, config) == theirs, case.name
        assert _chat_differences(case.input_ids[0].tolist(), theirs, tokenizer) <= KNOWN_DIFFERENCES, (
            case.name
        )


def test_checkpoint_flags_are_spelled_with_nvidias_parser():
    """The command line made from a checkpoint's args: a flag per field that differs from the
    parser's default, spelled as the parser spells it (store_true, store_false, values, lists)."""
    from modeling.megatron.megatron_lm import checkpoint_command_line

    parser = argparse.ArgumentParser()
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    parser.add_argument("--swiglu", action="store_true")
    parser.add_argument("--pixel-shuffle", action="store_true")
    parser.add_argument("--norm-epsilon", type=float, default=1e-5)
    parser.add_argument("--special-tokens", nargs="*", default=["<image>"])
    parser.add_argument("--image-tag-type", default="")
    stored = argparse.Namespace(
        num_layers=2, add_bias_linear=False, swiglu=True, pixel_shuffle=False, layernorm_epsilon=1e-6,
        special_tokens=["<image>", "<video>"], image_tag_type="nvlm", model_type=object(),
    )  # fmt: skip
    assert checkpoint_command_line(stored, parser) == [
        *("--num-layers", "2", "--norm-epsilon", "1e-06", "--swiglu", "--disable-bias-linear"),
        *("--special-tokens", "<image>", "<video>", "--image-tag-type", "nvlm"),
    ]


def test_te_emulation_refuses_an_fp8_extra_state():
    """TE's `_extra_state` with FP8 off (None, empty, a BytesIO of torch.save(None)) loads into the
    emulation; one that holds FP8 scales is refused, not silently dropped."""
    from modeling.megatron.te_emulation import _empty_extra_state

    def saved(value):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        buffer.seek(0)
        return buffer

    assert _empty_extra_state(None) and _empty_extra_state(torch.empty(0, dtype=torch.uint8))
    assert _empty_extra_state(saved(None)) and _empty_extra_state(io.BytesIO())
    assert not _empty_extra_state(saved({"scale_fwd": torch.ones(3)}))


def test_parity_check_with_nvidias_code_live(converted, tmp_path):
    """`parity-check logits --megatron-lm $NVLM_MEGATRON_LM` on the recipe's TP=8 checkpoint: NVIDIA's
    model (TE emulated, 8 gloo ranks) vs our class, every default case within 1e-5, same greedy
    tokens, our prompt emulation = NVIDIA's ids."""
    checkout = os.environ.get("NVLM_MEGATRON_LM")
    if not checkout:
        pytest.skip("NVLM_MEGATRON_LM (a Megatron-LM checkout, NVLM-1.0 or current) is not set")
    from click.testing import CliRunner

    from converter.parity_cli import main

    report_dir = tmp_path / "report"
    args = ["logits", "--megatron", FIXTURE / "sft-tp8", "--hf", converted, "--megatron-lm", checkout]
    args += ["--generate", "4", "--max-abs-diff", ATOL, "--report", report_dir]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-4000:]
    report = json.loads((report_dir / "report.json").read_text())
    assert checkout.rstrip("/") in report["megatron_code"] and "TE emulated" in report["megatron_code"]
    for row in report["cases"]:
        assert row["max_abs_diff"] <= ATOL and row["greedy_match"] == 1.0, row["name"]
        assert row["prompt_check"]["emulation_matches_megatron"], row["name"]
