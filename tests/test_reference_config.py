"""`megatron-to-hf --reference-config`: the release's non-weight fields copied, its sizes checked.

The oracle is the published release's config.json (../shared/reference/nvlm-d-72b): the
full-size checkpoint must agree with every structural field it states, and the fields it lends
(rope_scaling, processing and generation defaults) must land in the converted folder.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, TINY_TOKENIZER, cli, reference_file

from converter.reference_config import AGREE, COPY, NVLM_D_FIELDS, _assign, _lookup

SMALL = REPO / "tests" / "fixtures" / "nvlm-d-small-trained" / "megatron-tp2"
GPT = REPO / "tests" / "fixtures" / "megatron-lm-0.19-gpt" / "torch"


def test_each_field_has_one_rule():
    from converter.reference_config import QWEN2_FIELDS

    for table in (NVLM_D_FIELDS, QWEN2_FIELDS):
        paths = [row.path for row in table]
        assert len(paths) == len(set(paths)), [p for p in paths if paths.count(p) > 1]


def _release() -> dict:
    return json.loads(reference_file("config.json").read_text())


def test_the_72b_checkpoint_agrees_with_every_size_the_release_states(shapes_only_72b, tmp_path):
    from converter.engine import open_megatron
    from converter.families import family_for_args
    from converter.reference_config import apply_reference, load_reference

    code, output = cli(
        "megatron-to-hf", shapes_only_72b, "--dry-run", "--reference-config", reference_file("config.json")
    )
    assert code == 0, output
    ckpt = open_megatron(shapes_only_72b)
    family = family_for_args(ckpt.args)
    derived = family.hf_config(ckpt.args, ckpt=ckpt).to_dict()
    release = _release()
    compared = [row.path for row in NVLM_D_FIELDS if row.rule == AGREE and _lookup(release, row.path)[0]]
    # not vacuous: every size the release states is one the checkpoint's config states too
    assert all(_lookup(derived, path)[0] for path in compared) and len(compared) >= 25, compared
    reference = load_reference(reference_file("config.json").parent)  # the folder form
    config = apply_reference(family, family.hf_config(ckpt.args, ckpt=ckpt), reference, shapes_only_72b)
    family.write_extras(tmp_path, config)
    written = json.loads((tmp_path / "config.json").read_text())
    for row in NVLM_D_FIELDS:
        if row.rule == COPY and _lookup(release, row.path)[0]:
            assert _lookup(written, row.path) == _lookup(release, row.path), row.path
    assert written["llm_config"]["rope_scaling"] == {"factor": 3.0, "type": "dynamic"}


def _agreeing_reference(tmp_path, readme: str | None = None):
    """The release's config.json with the sizes of the shipped small checkpoint: everything else,
    rope_scaling included, as published."""
    from modeling import get_config

    release, small = _release(), get_config("small").to_dict()
    for row in NVLM_D_FIELDS:
        if row.rule == AGREE and _lookup(release, row.path)[0] and _lookup(small, row.path)[0]:
            _assign(release, row.path, _lookup(small, row.path)[1])
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(release))
    if readme:
        (folder / "README.md").write_text(readme)
    return folder


def test_release_fields_land_in_config_generation_config_and_card(tmp_path):
    from transformers import AutoConfig

    card = "---\nlicense: cc-by-nc-4.0\nbase_model:\n- Qwen/Qwen2-72B-Instruct\n---\n# NVLM-D-72B\n"
    reference = _agreeing_reference(tmp_path, card)
    dst = tmp_path / "hf"
    code, output = cli(
        "megatron-to-hf", SMALL, dst, "--tokenizer", TINY_TOKENIZER, "--reference-config", reference
    )
    assert code == 0, output
    config = json.loads((dst / "config.json").read_text())
    assert config["llm_config"]["rope_scaling"] == {"factor": 3.0, "type": "dynamic"}
    assert (config["template"], config["max_dynamic_patch"], config["use_thumbnail"]) == ("chatml", 6, True)
    loaded = AutoConfig.from_pretrained(dst, trust_remote_code=True)
    assert loaded.llm_config.rope_parameters["rope_type"] == "dynamic"
    assert loaded.llm_config.rope_parameters["factor"] == 3.0
    generation = json.loads((dst / "generation_config.json").read_text())
    # the release is greedy: its top_k/top_p are sampling-only and transformers refuses them there
    assert generation["do_sample"] is False and "top_k" not in generation and "top_p" not in generation
    assert generation["eos_token_id"] == 980  # the tokenizer's, not the reference's
    text = (dst / "README.md").read_text()
    assert "\nlicense: cc-by-nc-4.0\n" in text and "\nbase_model: Qwen/Qwen2-72B-Instruct\n" in text
    assert "from a `--reference-config`" in text
    code, output = cli("verify", dst)
    assert code == 0, output


def test_without_a_reference_nothing_is_invented(tmp_path):
    dst = tmp_path / "hf"
    code, output = cli("megatron-to-hf", SMALL, dst, "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    config = json.loads((dst / "config.json").read_text())
    assert config["llm_config"]["rope_scaling"] is None
    text = (dst / "README.md").read_text()
    assert "\nlicense: other\n" in text and "base_model" not in text and "--reference-config RELEASE" in text


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_disagreeing_reference_is_one_line_exit_2_and_nothing_written(tmp_path, dry_run):
    reference = tmp_path / "config.json"
    reference.write_text(json.dumps({"model_type": "NVLM_D", "llm_config": {"num_hidden_layers": 5}}))
    dst = tmp_path / "hf"
    args = ["--dry-run"] if dry_run else ["--tokenizer", TINY_TOKENIZER]
    code, output = cli("megatron-to-hf", SMALL, dst, *args, "--reference-config", reference)
    assert code == 2
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "llm_config.num_hidden_layers is 5 there but 4 in the checkpoint" in lines[0]
    assert str(reference) in lines[0] and not dst.exists()
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_an_unreadable_reference_is_one_line_exit_2(tmp_path):
    for content, problem in (("{not json", "is not JSON"), ("[1, 2]", "holds a list")):
        reference = tmp_path / "config.json"
        reference.write_text(content)
        code, output = cli("megatron-to-hf", SMALL, "--dry-run", "--reference-config", reference)
        assert code == 2 and problem in output and str(reference) in output
    code, output = cli("megatron-to-hf", SMALL, "--dry-run", "--reference-config", tmp_path / "absent")
    assert code == 2 and "cannot read the reference config" in output


def test_qwen2_reference_through_transformers_5_rope_parameters(tmp_path):
    """A plain Qwen2 checkpoint: rope_theta lives in rope_parameters on transformers 5; a reference
    states it the 4.x way and must still be compared, and its rope_scaling must still be taken."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "qwen2", "rope_theta": 1.5, "hidden_size": 64}))
    code, output = cli("megatron-to-hf", GPT, "--dry-run", "--reference-config", bad)
    assert code == 2 and "rope_theta is 1.5 there but" in output, output
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"hidden_size": 64, "rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    dst = tmp_path / "hf"
    code, output = cli("megatron-to-hf", GPT, dst, "--tokenizer", TINY_TOKENIZER, "--reference-config", good)
    assert code == 0, output
    rope = json.loads((dst / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["factor"]) == ("dynamic", 2.0)
