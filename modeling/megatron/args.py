"""Megatron-LM's `args` for an NVLM-D checkpoint, and the NVLM_D_Config they describe.

Pure Python (no megatron-core import): the converter reads checkpoints without Megatron. The
args names of each Megatron-LM generation, the config tables (both directions) and the padding
rules live in mappings/megatron_args.py (the NVLM-D table in mappings/nvlm_d.py); here:
`megatron_args(config, layout, ...)`, that table written at a layout. Its inverse, the NVLM_D_Config
of a checkpoint's args and tensors, is the NVLM-D family's (converter/families/nvlm_d.py
`config_from_args`).
"""

from __future__ import annotations

import argparse

import torch

from mappings.megatron_args import (  # noqa: F401  (re-exported: callers read the args through here)
    ARG_NAMES,
    GENERATIONS,
    MCORE_016,
    MCORE_019,
    NVLM_1_0,
    arg,
    check_args_against_tensors,
    decoder_fields,
    decoder_structure,
    generation_of,
    padded_head_count,
    true_vocab,
)
from mappings.nvlm_d import NVLM_D_ARGS


def megatron_args(
    config,
    layout,
    *,
    padded_vocab: int,
    divisible_by: int,
    dtype: torch.dtype,
    spec: str,
    tokenizer_vocab: int,
) -> argparse.Namespace:
    """The fields Megatron-LM records in `args`, for an NVLM-D model (the NVLM_D table)."""
    return NVLM_D_ARGS.to_args(
        config,
        tp=layout.tp,
        pp=layout.pp,
        padded_vocab=padded_vocab,
        divisible_by=divisible_by,
        dtype=dtype,
        spec=spec,
        tokenizer_vocab=tokenizer_vocab,
    )
