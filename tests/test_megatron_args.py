"""Args as Megatron-LM really stores them (issue 14 item 1): one table of names per generation, and
sizes derived from the tensors where they are certain. The real checkpoints of each generation are
tested in tests/test_megatron_lm_gpt.py and tests/test_nvlm10_recipe.py; here, the rules one by one."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from conftest import TINY_TOKENIZER, cli

from modeling.megatron.args import (
    ARG_NAMES,
    GENERATIONS,
    MCORE_016,
    MCORE_019,
    NVLM_1_0,
    arg,
    generation_of,
    true_vocab,
)


def test_every_row_names_known_generations_only():
    for canonical, renamed in ARG_NAMES.items():
        assert set(renamed) <= set(GENERATIONS), canonical


def test_a_renamed_field_is_read_under_each_generations_name():
    new = argparse.Namespace(layernorm_epsilon=1e-6, num_layers=2)
    old = argparse.Namespace(norm_epsilon=1e-5, num_layers=2)
    assert arg(new, "norm_epsilon") == 1e-6 and arg(old, "norm_epsilon") == 1e-5
    assert generation_of(new) == MCORE_019 and generation_of(old) == MCORE_016
    with pytest.raises(AttributeError, match="norm_epsilon / layernorm_epsilon"):
        arg(argparse.Namespace(), "norm_epsilon")


def test_nvlm_1_0_is_told_by_its_model_type():
    from converter.formats.safe_pickle import stand_in_for

    model_type = stand_in_for("megatron.core.enums.ModelType")(2)  # encoder_and_decoder, gone in 0.14
    assert generation_of(argparse.Namespace(norm_epsilon=1e-6, model_type=model_type)) == NVLM_1_0


@pytest.mark.parametrize(
    "fields, tokenizer, expected",
    [
        (dict(vocab_size=1000), None, 1000),
        # NullTokenizer appended an eod id before megatron-core 0.18; since then eod = vocab_size - 1
        (dict(vocab_size=999, tokenizer_type="NullTokenizer"), None, 1000),
        (dict(vocab_size=1000, tokenizer_type="NullTokenizer", null_tokenizer_eod_id=999), None, 1000),
        # NVLM-1.0 stores vocab_size None: the tokenizer decides
        (dict(vocab_size=None, padded_vocab_size=1024), 1000, 1000),
        (dict(vocab_size=None, padded_vocab_size=1024), None, 1024),
    ],
)
def test_true_vocab(fields, tokenizer, expected):
    assert true_vocab(argparse.Namespace(**fields), tokenizer) == expected


pytest.importorskip("megatron.core", reason="the checkpoints are made by the Megatron side")

# The ViT fields only our own writer records: a Megatron-LM checkpoint has none of them.
OUR_VIT_FIELDS = (
    "vision_hidden_size",
    "vision_ffn_hidden_size",
    "vision_num_attention_heads",
    "vision_num_real_attention_heads",
    "vision_kv_channels",
    "vision_norm_epsilon",
    "encoder_num_layers",
)


def _as_megatron_lm_writes_it(checkpoints, tmp_path, vision_model_type):
    """Our TP=2 PP=2 checkpoint with args as examples/multimodal stores them: no ViT size."""
    import torch

    from converter.formats import safe_pickle

    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp2-pp2"], source)
    for rank in source.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = safe_pickle.load(rank, mmap=False)
        for name in OUR_VIT_FIELDS:
            delattr(state["args"], name)
        state["args"].vision_model_type = vision_model_type
        state["args"].encoder_num_layers = state["args"].num_layers  # what validate_args leaves there
        torch.save(state, rank)
    return source


def _converted_config(tmp_path, source, *options):
    out = tmp_path / "hf"
    code, output = cli("megatron-to-hf", source, out, "--tokenizer", TINY_TOKENIZER, *options)
    assert code == 0, output
    return json.loads((out / "config.json").read_text()), out


def test_vit_sizes_come_from_the_tensors_and_real_heads_from_the_zero_heads(checkpoints, tmp_path):
    source = _as_megatron_lm_writes_it(checkpoints, tmp_path, "an-unknown-vit")
    config, out = _converted_config(tmp_path, source)
    vision = config["vision_config"]
    assert (vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]) == (80, 160, 2)
    assert (vision["num_attention_heads"], vision["num_dummy_heads"]) == (5, 7)  # 6 heads stored at TP=2
    assert (vision["image_size"], vision["patch_size"]) == (64, 8)
    # the same bytes as from the checkpoint whose args say everything
    reference = tmp_path / "reference"
    assert cli("megatron-to-hf", checkpoints["tp2-pp2"], reference, "--tokenizer", TINY_TOKENIZER)[0] == 0
    for shard in reference.glob("*.safetensors"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_where_nothing_tells_the_real_heads_the_option_is_named(checkpoints, tmp_path):
    """Zero-padded heads tell the real count; a checkpoint whose heads are all real at TP=1 cannot
    tell 5 heads of 16 from 10 of 8: the error names --vision-real-heads, which then decides."""
    import torch

    from converter.formats import safe_pickle

    source = tmp_path / "tp1"
    shutil.copytree(checkpoints["tp1-te"], source)
    rank = next(source.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    state = safe_pickle.load(rank, mmap=False)
    for name in OUR_VIT_FIELDS:
        delattr(state["args"], name)
    state["args"].vision_model_type = "an-unknown-vit"
    torch.save(state, rank)
    code, output = cli("megatron-to-hf", source, tmp_path / "hf", "--tokenizer", TINY_TOKENIZER)
    assert code == 2 and "--vision-real-heads" in output and "Traceback" not in output, output
    config, _ = _converted_config(tmp_path, source, "--vision-real-heads", "5")
    assert config["vision_config"]["num_attention_heads"] == 5


# --- the config tables (mappings/megatron_args.py and each family's table) ----------------------


def _qwen2_config(**overrides):
    from transformers import Qwen2Config

    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        vocab_size=200,
        tie_word_embeddings=False,
    )
    return Qwen2Config(**{**fields, **overrides})


def test_a_config_table_goes_both_ways():
    """HF config -> args (the table, in its order) -> the same HF decoder fields back."""
    import torch

    from mappings.megatron_args import decoder_fields
    from mappings.qwen2 import QWEN2_ARGS

    config = _qwen2_config()
    args = QWEN2_ARGS.to_args(config, tp=2, pp=3, dtype=torch.bfloat16, divisible_by=128, rows=200)
    assert list(vars(args)) == [field.name for field in QWEN2_ARGS.fields]  # the order rank files hold
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 3)
    assert (args.vocab_size, args.padded_vocab_size) == (200, 256)  # padded to 128 x TP
    assert args.rotary_base == 5000 and isinstance(args.rotary_base, int)
    back = decoder_fields(args)
    assert back == {
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 96,
        "rms_norm_eps": 1e-5,
        "rope_theta": 5000.0,
        "tie_word_embeddings": False,
    }


def test_the_decoder_fields_read_every_generations_names():
    """A 0.19 checkpoint stores the norm epsilon as layernorm_epsilon; without
    group_query_attention the KV heads are the query heads; untie missing means tied."""
    from mappings.megatron_args import decoder_fields

    args = argparse.Namespace(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=1,  # ignored: no group_query_attention
        max_position_embeddings=16,
        layernorm_epsilon=1e-6,
        rotary_base=10000,
    )
    fields = decoder_fields(args)
    assert fields["rms_norm_eps"] == 1e-6 and fields["num_key_value_heads"] == 4
    assert fields["tie_word_embeddings"] is True and fields["rope_theta"] == 10000.0


def test_each_padding_rule_has_one_home():
    """The transforms, the Megatron builder and the families use mappings/megatron_args.py's rules."""
    from mappings import megatron_args, transforms
    from modeling.megatron import args as megatron_side

    assert transforms.megatron_vit_heads is megatron_args.padded_head_count
    assert transforms.megatron_vocab_rows is megatron_args.padded_vocab_size
    assert megatron_side.padded_head_count is megatron_args.padded_head_count
    assert [megatron_args.padded_vocab_size(200, tp) for tp in (1, 2, 4)] == [256, 256, 512]
    assert megatron_args.hf_vocab_rows(151665) == 152064 and megatron_args.hf_vocab_rows(200) == 200
    assert megatron_args.hf_vocab_rows(200, 128) == 256


def test_the_families_write_their_tables():
    """hf-to-megatron's args are each family's table: Qwen2's for a Qwen2Config."""
    import torch

    from converter.families import Qwen2
    from mappings.qwen2 import QWEN2_ARGS

    config = _qwen2_config(tie_word_embeddings=True)
    args = Qwen2.megatron_args(config, 1, 1, dtype=torch.float32, divisible_by=64)
    assert vars(args) == vars(
        QWEN2_ARGS.to_args(config, tp=1, pp=1, dtype=torch.float32, divisible_by=64, rows=200)
    )
    assert args.untie_embeddings_and_output_weights is False and args.padded_vocab_size == 256
