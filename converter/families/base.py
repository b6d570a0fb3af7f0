"""The contract every model family implements, and the registry lookups the CLI loops over.

A family joins a mapping table (mappings/) to the model class it targets. It answers: is this
Megatron checkpoint mine (from its args) / is this config.json mine? what HF config and which
tensors (names and shapes) does it convert to? which rows map them? which files besides the weights
does the HF folder need? which token is its image placeholder? which args does `inspect` show?
which dtype does each tensor get under `--dtype official`? Defaults below are what a plain
language model needs; a family overrides what differs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mappings.table import Table

# The args `convert-checkpoint inspect` shows (where the checkpoint has them).
INSPECT_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "padded_vocab_size",
    "encoder_num_layers",
    "vision_hidden_size",
    "vision_num_attention_heads",
)

FIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Family:
    """One model family. Used as a class (every method a static or class method): a family has no
    state of its own, a conversion passes it the config and args."""

    name: str = ""  # in messages and the plan line
    card_title: str = ""  # the model card (converter/model_card.py)
    pipeline_tag: str = "text-generation"
    auto_class: str = "AutoModelForCausalLM"
    card_tags: tuple[str, ...] = ()
    reference_fields: tuple = ()  # --reference-config: what agrees, what is copied
    image_token: str | None = None  # the tokenizer's image placeholder, whose id config.json records
    hf_model_types: tuple[str, ...] = ()  # the config.json `model_type` values this family reads
    inspect_fields: tuple[str, ...] = INSPECT_FIELDS
    # the layer stack that pipeline stages split (numbered stage-locally in legacy rank files)
    pipelined_stack: str = "decoder.layers."

    @staticmethod
    def detect(args) -> bool:
        """Whether a Megatron checkpoint's args describe this family's model."""
        raise NotImplementedError

    @classmethod
    def claims_hf_config(cls, config_json: dict) -> bool:
        """Whether an HF folder's config.json describes this family's model."""
        return config_json.get("model_type") in cls.hf_model_types

    @staticmethod
    def hf_config(args, *, ckpt=None, tokenizer=None, vision_real_heads=None):
        """The HF config of a checkpoint: sizes from its tensors (`ckpt`) where they are certain,
        the rest from its args; special ids from the tokenizer (a TokenizerInfo)."""
        raise NotImplementedError

    @staticmethod
    def config_class():
        raise NotImplementedError

    @staticmethod
    def table(config, divisible_by: int = 128) -> Table:
        raise NotImplementedError

    @staticmethod
    def expected(config) -> dict[str, tuple[int, ...]]:
        """Every tensor name (as save_pretrained writes it) and shape of the HF model."""
        raise NotImplementedError

    @staticmethod
    def official_dtype(name: str) -> torch.dtype:
        """The release's dtype of one HF tensor (`--dtype official`)."""
        return torch.bfloat16

    @classmethod
    def dtype_policy(cls, choice: str) -> Callable[[str, torch.dtype], torch.dtype]:
        """`--dtype` as a function (HF name, source dtype) -> output dtype."""
        if choice == "official":
            return lambda name, source: cls.official_dtype(name)
        if choice == "source":
            return lambda name, source: source
        return lambda name, source, fixed=FIXED_DTYPES[choice]: fixed

    @staticmethod
    def megatron_args(config, tp: int, pp: int, *, dtype, divisible_by: int, tokenizer_vocab=None):
        """The args a Megatron checkpoint of this config records (hf-to-megatron)."""
        raise NotImplementedError

    @staticmethod
    def write_extras(folder: Path, config) -> None:
        """Files beside the weights: config.json and the generation config."""
        from transformers import GenerationConfig

        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)


def record_special_tokens(text_config, tokenizer) -> None:
    """eos / bos / pad ids of the tokenizer into the config that generation reads them from (None
    left as is where the tokenizer has none): without eos, generate() runs to max_new_tokens."""
    for field in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, field)
        if value is not None:
            setattr(text_config, field, value)


class CheckpointTensors:
    """What the config derivation may ask of a checkpoint: its tensor names, a tensor's global
    shape and the global tensor, given how TP splits it (0 column, 1 row, None replicated)."""

    def __init__(self, ckpt):
        from mappings.transforms import Column, Replicated, Row

        self._ckpt = ckpt
        self._by_dim = {0: Column(), 1: Row(), None: Replicated()}
        self.names = set(ckpt.names())

    def shape(self, name: str, tp_dim: int | None) -> tuple[int, ...]:
        if name not in self.names:
            raise KeyError(f"the checkpoint has no {name}")
        return tuple(self._ckpt.shape(name, self._by_dim[tp_dim]))

    def read(self, name: str, tp_dim: int | None) -> torch.Tensor:
        return self._ckpt.read(name, self._by_dim[tp_dim])


def family_for_args(args, families):
    """The first family of the registry whose `detect` accepts the checkpoint's args."""
    for family in families:
        if family.detect(args):
            return family
    raise ValueError("no known model family")


def family_for_hf_config(config_json: dict, families):
    """The first family of the registry that claims the folder's config.json."""
    for family in families:
        if family.claims_hf_config(config_json):
            return family
    raise ValueError(f"no known model family for model_type {config_json.get('model_type')!r}")
