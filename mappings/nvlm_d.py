"""NVLM-D: Megatron-Core LLaVAModel <-> our NVLM_D_Model (the published release's names).

    language_model.*     -> language_model.*            the Qwen2 rows (mappings/qwen2.py)
    vision_model.*       -> vision_model.*              InternViT, padded heads re-laid
    vision_projection.*  -> mlp1.*                      LayerNorm -> fc1 -> GELU -> fc2

Every tensor of both layouts appears in exactly one row below.
"""

from __future__ import annotations

import re

import torch

from .megatron_args import (
    FFN_HIDDEN,
    HEADS,
    HIDDEN,
    MAX_POSITIONS,
    NORM_EPSILON,
    NUM_LAYERS,
    QUERY_GROUPS,
    ROTARY_BASE,
    ConfigTable,
    Field,
    constant,
    from_context,
    padded_head_count,
)
from .qwen2 import qwen2_rules
from .table import Table, row
from .transforms import Column, PositionEmbedding, Replicated, Row, ViTProj, ViTQKNorm, ViTQKV


def nvlm_d_table(
    *,
    llm_heads: int,
    llm_groups: int,
    llm_head_dim: int,
    hf_vocab_rows: int,
    vit_real_heads: int,
    vit_hf_heads: int,
    vit_head_dim: int,
    divisible_by: int = 128,
) -> Table:
    vit_m, vit_h = "vision_model.decoder.layers.{i}.", "vision_model.encoder.layers.{i}."
    heads = dict(real_heads=vit_real_heads, hf_heads=vit_hf_heads, head_dim=vit_head_dim)
    vision = (
        row("vision_model.conv1.weight", "vision_model.embeddings.patch_embedding.weight", Replicated()),
        row("vision_model.conv1.bias", "vision_model.embeddings.patch_embedding.bias", Replicated()),
        row("vision_model.class_token", "vision_model.embeddings.class_embedding", Replicated()),
        row(
            "vision_model.position_embeddings.weight",
            "vision_model.embeddings.position_embedding",
            PositionEmbedding(),
        ),
        row(f"{vit_m}input_layernorm.weight", f"{vit_h}norm1.weight", Replicated()),
        row(f"{vit_m}self_attention.linear_qkv.weight", f"{vit_h}attn.qkv.weight", ViTQKV(**heads)),
        row(f"{vit_m}self_attention.q_layernorm.weight", f"{vit_h}attn.q_norm.weight", ViTQKNorm(**heads)),
        row(f"{vit_m}self_attention.k_layernorm.weight", f"{vit_h}attn.k_norm.weight", ViTQKNorm(**heads)),
        row(f"{vit_m}self_attention.linear_proj.weight", f"{vit_h}attn.proj.weight", ViTProj(**heads)),
        row(f"{vit_m}self_attention.linear_proj.bias", f"{vit_h}attn.proj.bias", Replicated()),
        row(f"{vit_m}ls1", f"{vit_h}ls1", Replicated()),
        row(f"{vit_m}ls2", f"{vit_h}ls2", Replicated()),
        row(f"{vit_m}pre_mlp_layernorm.weight", f"{vit_h}norm2.weight", Replicated()),
        row(f"{vit_m}mlp.linear_fc1.weight", f"{vit_h}mlp.fc1.weight", Column()),
        row(f"{vit_m}mlp.linear_fc1.bias", f"{vit_h}mlp.fc1.bias", Column()),
        row(f"{vit_m}mlp.linear_fc2.weight", f"{vit_h}mlp.fc2.weight", Row()),
        row(f"{vit_m}mlp.linear_fc2.bias", f"{vit_h}mlp.fc2.bias", Replicated()),
    )
    projector = (
        row("vision_projection.encoder.linear_fc1.layer_norm_weight", "mlp1.0.weight", Replicated()),
        row("vision_projection.encoder.linear_fc1.layer_norm_bias", "mlp1.0.bias", Replicated()),
        row("vision_projection.encoder.linear_fc1.weight", "mlp1.1.weight", Column()),
        row("vision_projection.encoder.linear_fc2.weight", "mlp1.3.weight", Row()),
    )
    language = qwen2_rules(
        heads=llm_heads,
        groups=llm_groups,
        head_dim=llm_head_dim,
        hf_vocab_rows=hf_vocab_rows,
        divisible_by=divisible_by,
        megatron_prefix="language_model.",
        hf_prefix="language_model.",
    )
    return Table(rules=language + vision + projector)


def table_for(config, divisible_by: int = 128) -> Table:
    """The table for an NVLM_D_Config."""
    llm, vit = config.llm_config, config.vision_config
    return nvlm_d_table(
        llm_heads=llm.num_attention_heads,
        llm_groups=llm.num_key_value_heads,
        llm_head_dim=llm.hidden_size // llm.num_attention_heads,
        hf_vocab_rows=llm.vocab_size,
        vit_real_heads=vit.num_attention_heads,
        vit_hf_heads=vit.num_attention_heads + vit.num_dummy_heads,
        vit_head_dim=vit.hidden_size // vit.num_attention_heads,
        divisible_by=divisible_by,
    )


# The published release stores these in float32 and everything else in bfloat16
# (NVLM_FACTS section 5: the shard byte counts fit only this way). `--dtype official` reproduces it.
_OFFICIAL_FP32 = re.compile(
    r"language_model\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)"
    r"|vision_model\.encoder\.layers\.\d+\.attn\.(qkv\.weight|proj\.weight|q_norm\.weight|k_norm\.weight)"
)


def official_dtype(hf_name: str) -> torch.dtype:
    return torch.float32 if _OFFICIAL_FP32.fullmatch(hf_name) else torch.bfloat16


# the args hf-to-megatron records, as Megatron-LM records them (modeling/megatron/args.py writes it)
NVLM_D_ARGS = ConfigTable(
    (
        # parallelism
        from_context("tensor_model_parallel_size", "tp"),
        from_context("pipeline_model_parallel_size", "pp"),
        constant("virtual_pipeline_model_parallel_size", None),
        constant("encoder_tensor_model_parallel_size", 0),
        constant("encoder_pipeline_model_parallel_size", 0),
        # language model (Qwen2)
        NUM_LAYERS,
        HIDDEN,
        FFN_HIDDEN,
        HEADS,
        Field(
            "group_query_attention",
            write=lambda c, x: x.text.num_key_value_heads != x.text.num_attention_heads,
        ),
        QUERY_GROUPS,
        Field("kv_channels", write=lambda c, x: x.text.hidden_size // x.text.num_attention_heads),
        MAX_POSITIONS,
        Field("seq_length", write=lambda c, x: x.text.max_position_embeddings),
        constant("position_embedding_type", "rope"),
        ROTARY_BASE,
        constant("rotary_percent", 1.0),
        constant("use_rope_scaling", False),
        constant("normalization", "RMSNorm"),
        NORM_EPSILON,
        constant("swiglu", True),
        constant("add_bias_linear", False),
        constant("add_qkv_bias", True),
        constant("untie_embeddings_and_output_weights", True),
        from_context("vocab_size", "tokenizer_vocab"),
        from_context("padded_vocab_size", "padded_vocab"),
        from_context("make_vocab_size_divisible_by", "divisible_by"),
        from_context("params_dtype", "dtype"),
        Field("bf16", write=lambda c, x: x.dtype == torch.bfloat16),
        Field("fp16", write=lambda c, x: x.dtype == torch.float16),
        Field("transformer_impl", write=lambda c, x: "transformer_engine" if x.spec == "te" else "local"),
        constant("tokenizer_prompt_format", "qwen2p0"),
        # vision model (InternViT) and projector
        constant("vision_model_type", "internvit"),
        Field("encoder_num_layers", write=lambda c, x: c.vision_config.num_hidden_layers),
        Field("vision_hidden_size", write=lambda c, x: c.vision_config.hidden_size),
        Field("vision_ffn_hidden_size", write=lambda c, x: c.vision_config.intermediate_size),
        Field(
            "vision_num_attention_heads",
            write=lambda c, x: padded_head_count(c.vision_config.num_attention_heads, x.tp),
        ),
        Field("vision_num_real_attention_heads", write=lambda c, x: c.vision_config.num_attention_heads),
        Field("vision_kv_channels", write=lambda c, x: c.vision_config.head_dim),
        Field("vision_norm_epsilon", write=lambda c, x: c.vision_config.layer_norm_eps),
        Field("img_h", write=lambda c, x: c.image_size),
        Field("img_w", write=lambda c, x: c.image_size),
        Field("patch_dim", write=lambda c, x: c.vision_config.patch_size),
        constant("disable_vision_class_token", False),
        Field("pixel_shuffle", write=lambda c, x: c.downsample_ratio == 0.5),
        constant("use_tile_tags", True),
        Field("max_num_tiles", write=lambda c, x: c.max_dynamic_patch),
        Field("use_thumbnail", write=lambda c, x: c.use_thumbnail),
        constant("use_tiling", True),
        Field("special_tokens", write=lambda c, x: ["<image>"]),
        constant("image_tag_type", "nvlm"),
        constant("vision_projection_type", "mlp"),
        Field("projector_ffn_hidden_size", write=lambda c, x: x.text.intermediate_size),
        Field("projector_layer_norm_eps", write=lambda c, x: c.projector_layer_norm_eps),
        # not a Megatron-LM field: the image placeholder's id in the tokenizer, recorded for convenience
        Field("image_token_id", write=lambda c, x: c.img_context_token_id),
    ),
    text=lambda config: config.llm_config,
)
