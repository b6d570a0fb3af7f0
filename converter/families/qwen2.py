"""The Qwen2 family: a plain Megatron GPT checkpoint of a Qwen2 model <-> transformers'
Qwen2ForCausalLM. Rows: mappings/qwen2.py."""

from __future__ import annotations

import torch

from mappings.megatron_args import (
    check_args_against_tensors,
    decoder_fields,
    decoder_structure,
    hf_vocab_rows,
    true_vocab,
)
from mappings.qwen2 import QWEN2_ARGS, qwen2_table_for
from mappings.table import Table

from ..reference_config import QWEN2_FIELDS
from ..tokenizer_folder import TokenizerInfo
from .base import CheckpointTensors, Family, record_special_tokens


class Qwen2(Family):
    """A plain Megatron GPT checkpoint of a Qwen2 model -> transformers' Qwen2ForCausalLM."""

    name = "qwen2"
    card_title = "A Qwen2 causal language model (transformers' Qwen2ForCausalLM)"
    pipeline_tag = "text-generation"
    auto_class = "AutoModelForCausalLM"
    card_tags = ()
    reference_fields = QWEN2_FIELDS

    @classmethod
    def claims_hf_config(cls, config_json: dict) -> bool:
        return (
            True  # last in the registry: any other config.json is read as Qwen2 (its class refuses the rest)
        )

    @staticmethod
    def detect(args) -> bool:
        return getattr(args, "vision_model_type", None) is None

    @staticmethod
    def hf_config(args, *, ckpt=None, tokenizer=None, vision_real_heads=None):
        from transformers import Qwen2Config

        tokenizer = tokenizer or TokenizerInfo()
        vocab = true_vocab(args, tokenizer.size)
        fields = decoder_fields(args)
        if ckpt is not None:  # the tensors are certain where args of some generations are not
            fields.update(decoder_structure(CheckpointTensors(ckpt), fields, prefix=""))
            check_args_against_tensors(args, fields)
        config = Qwen2Config(**fields, vocab_size=hf_vocab_rows(vocab), architectures=["Qwen2ForCausalLM"])
        record_special_tokens(config, tokenizer)
        return config

    @staticmethod
    def config_class():
        from transformers import Qwen2Config

        return Qwen2Config

    @staticmethod
    def table(config, divisible_by: int = 128) -> Table:
        return Table(rules=qwen2_table_for(config, divisible_by))

    @staticmethod
    def expected(config) -> dict[str, tuple[int, ...]]:
        from transformers import Qwen2ForCausalLM

        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # not stored on either side
        return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}

    @staticmethod
    def megatron_args(config, tp, pp, *, dtype, divisible_by, tokenizer_vocab=None):
        """mappings/qwen2.py's QWEN2_ARGS table (Megatron pads from the HF rows: none is lost)."""
        return QWEN2_ARGS.to_args(
            config, tp=tp, pp=pp, dtype=dtype, divisible_by=divisible_by, rows=config.vocab_size
        )
