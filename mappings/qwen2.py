"""Qwen2 decoder: Megatron-Core GPTModel <-> transformers' Qwen2ForCausalLM.

Used alone for a plain Megatron GPT checkpoint of a Qwen2 model (prefixes "" and "" -> "model."),
and by NVLM-D for its language model (prefix "language_model." on both sides).
"""

from __future__ import annotations

from .megatron_args import (
    FFN_HIDDEN,
    HEADS,
    HIDDEN,
    MAX_POSITIONS,
    NORM_EPSILON,
    NUM_LAYERS,
    QUERY_GROUPS,
    ROTARY_BASE,
    UNTIE,
    ConfigTable,
    Field,
    constant,
    from_context,
    padded_rows,
)
from .table import Rule, row
from .transforms import GQAQKV, GatedMLP, Replicated, Row, Vocab


def qwen2_rules(
    *,
    heads: int,
    groups: int,
    head_dim: int,
    hf_vocab_rows: int,
    divisible_by: int = 128,
    megatron_prefix: str = "",
    hf_prefix: str = "",
    tied: bool = False,
) -> tuple[Rule, ...]:
    m, h = megatron_prefix, hf_prefix
    layer_m, layer_h = f"{m}decoder.layers.{{i}}.", f"{h}model.layers.{{i}}."
    qkv = GQAQKV(groups=groups, heads_per_group=heads // groups, head_dim=head_dim)
    vocab = Vocab(rows=hf_vocab_rows, divisible_by=divisible_by)
    rows = (
        row(f"{m}embedding.word_embeddings.weight", f"{h}model.embed_tokens.weight", vocab),
        row(
            (f"{layer_m}input_layernorm.weight", f"{layer_m}self_attention.linear_qkv.layer_norm_weight"),
            f"{layer_h}input_layernorm.weight",
            Replicated(),
        ),
        row(
            f"{layer_m}self_attention.linear_qkv.weight",
            tuple(f"{layer_h}self_attn.{p}_proj.weight" for p in "qkv"),
            qkv,
        ),
        row(
            f"{layer_m}self_attention.linear_qkv.bias",
            tuple(f"{layer_h}self_attn.{p}_proj.bias" for p in "qkv"),
            qkv,
        ),
        row(f"{layer_m}self_attention.linear_proj.weight", f"{layer_h}self_attn.o_proj.weight", Row()),
        row(
            (f"{layer_m}pre_mlp_layernorm.weight", f"{layer_m}mlp.linear_fc1.layer_norm_weight"),
            f"{layer_h}post_attention_layernorm.weight",
            Replicated(),
        ),
        row(
            f"{layer_m}mlp.linear_fc1.weight",
            (f"{layer_h}mlp.gate_proj.weight", f"{layer_h}mlp.up_proj.weight"),
            GatedMLP(),
        ),
        row(f"{layer_m}mlp.linear_fc2.weight", f"{layer_h}mlp.down_proj.weight", Row()),
        row(f"{m}decoder.final_layernorm.weight", f"{h}model.norm.weight", Replicated()),
    )
    if tied:  # lm_head shares the embedding: neither side stores it
        return rows
    return (*rows, row(f"{m}output_layer.weight", f"{h}lm_head.weight", vocab))


def qwen2_table_for(config, divisible_by: int = 128) -> tuple[Rule, ...]:
    """Rows for a transformers Qwen2Config (LLM-only checkpoints)."""
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    return qwen2_rules(
        heads=heads,
        groups=groups,
        head_dim=config.hidden_size // heads,
        hf_vocab_rows=config.vocab_size,
        divisible_by=divisible_by,
        tied=config.tie_word_embeddings,
    )


# the args hf-to-megatron records (mappings/megatron_args.py: Field, ConfigTable)
QWEN2_ARGS = ConfigTable(
    (
        from_context("tensor_model_parallel_size", "tp"),
        from_context("pipeline_model_parallel_size", "pp"),
        NUM_LAYERS,
        HIDDEN,
        FFN_HIDDEN,
        HEADS,
        constant("group_query_attention", True),
        QUERY_GROUPS,
        Field("kv_channels", write=lambda c, x: x.text.hidden_size // x.text.num_attention_heads),
        MAX_POSITIONS,
        NORM_EPSILON,
        ROTARY_BASE,
        constant("swiglu", True),
        constant("add_qkv_bias", True),
        constant("add_bias_linear", False),
        UNTIE,
        from_context("vocab_size", "rows"),
        Field("padded_vocab_size", write=padded_rows),
        from_context("make_vocab_size_divisible_by", "divisible_by"),
        from_context("params_dtype", "dtype"),
        constant("normalization", "RMSNorm"),
        constant("position_embedding_type", "rope"),
    )
)
