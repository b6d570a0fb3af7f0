"""Model families the converter knows: each joins a mapping table to the model class it targets.

The contract is converter/families/base.py; adding a model family = a table in mappings/ + a
class here (one module) + its line in FAMILIES below. Nothing outside mappings/ and this package
names a family.
"""

from __future__ import annotations

from mappings.megatron_args import hf_vocab_rows

from . import base
from .base import CheckpointTensors, Family, record_special_tokens
from .llava import LLaVA
from .nvlm_d import NVLMD, REMOTE_CODE
from .qwen2 import Qwen2

# The registry, in the order it is asked: first match wins (LLaVA's vision_model_type 'clip'
# before NVLM-D's any vision model; Qwen2, the plain GPT, last).
FAMILIES = (LLaVA, NVLMD, Qwen2)

# what a legacy reader renumbers across pipeline stages, before the family is known (from args)
PIPELINED_STACKS = tuple(dict.fromkeys(family.pipelined_stack for family in FAMILIES))


def family_for_args(args):
    return base.family_for_args(args, FAMILIES)


def family_for_hf_config(config_json: dict):
    return base.family_for_hf_config(config_json, FAMILIES)


__all__ = [
    "FAMILIES",
    "PIPELINED_STACKS",
    "REMOTE_CODE",
    "CheckpointTensors",
    "Family",
    "LLaVA",
    "NVLMD",
    "Qwen2",
    "family_for_args",
    "family_for_hf_config",
    "hf_vocab_rows",
    "record_special_tokens",
]
