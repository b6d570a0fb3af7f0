"""LLaVA as Megatron-LM's examples/multimodal trains it by default: Megatron-Core LLaVAModel (CLIP ViT
through CLIPViTModel, the `mlp` projector, a Mistral-shaped GPT) <-> transformers'
LlavaForConditionalGeneration, under the names its save_pretrained writes.

    language_model.*     -> language_model.*           the GPT decoder rows (mappings/qwen2.py); no
                                                       QKV bias here, so the bias row stays unused
    vision_model.*       -> vision_tower.*             CLIP ViT: class token, ln_pre, MHA with biases
    vision_projection.*  -> multi_modal_projector.*    fc1 -> GELU -> fc2 (biases when the model has them)

The correspondence, piece by piece:
- CLIPViTModel (subtype "clip") puts the class token first, adds the position embeddings of all
  patches + 1 positions, applies `ln_pre` (HF: `pre_layrnorm`) and runs every layer; it has no
  `ln_post`. The projector reads the LAST layer's output, so HF's `vision_feature_layer` is -1;
  `--disable-vision-class-token` (the recipe's) drops the class token: HF's
  `vision_feature_select_strategy` "default" (else "full"). HF's `post_layernorm` only serves the
  pooled output LLaVA never reads: it rides on the `ln_pre` rows, written as the identity.
- The ViT's fused QKV is multi-head attention: GQA with one query head per group, per head
  [q_h; k_h; v_h], weight and bias alike.
- HF's projector is text-hidden wide (linear_1: vision hidden -> text hidden, linear_2: text hidden
  -> text hidden): Megatron's projector converts when its ffn_hidden_size is the LLM's hidden size.

Every tensor of both layouts appears in exactly one row below.
"""

from __future__ import annotations

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
    padded_rows,
)
from .qwen2 import qwen2_rules
from .table import Rule, Table, row
from .transforms import GQAQKV, ClassToken, Column, Replicated, Row, WithUnused


def vision_rules(*, heads: int, head_dim: int) -> tuple[Rule, ...]:
    m, h = "vision_model.", "vision_tower."
    layer_m, layer_h = f"{m}decoder.layers.{{i}}.", f"{h}encoder.layers.{{i}}."
    qkv = GQAQKV(groups=heads, heads_per_group=1, head_dim=head_dim)
    rows = [
        row(f"{m}conv1.weight", f"{h}embeddings.patch_embedding.weight", Replicated()),
        row(f"{m}class_token", f"{h}embeddings.class_embedding", ClassToken()),
        row(f"{m}position_embeddings.weight", f"{h}embeddings.position_embedding.weight", Replicated()),
        row(
            f"{m}ln_pre.weight",
            (f"{h}pre_layrnorm.weight", f"{h}post_layernorm.weight"),
            WithUnused(fill=1.0),
        ),
        row(f"{m}ln_pre.bias", (f"{h}pre_layrnorm.bias", f"{h}post_layernorm.bias"), WithUnused(fill=0.0)),
    ]
    for part in ("weight", "bias"):
        rows += [
            row(
                (f"{layer_m}input_layernorm.{part}", f"{layer_m}self_attention.linear_qkv.layer_norm_{part}"),
                f"{layer_h}layer_norm1.{part}",
                Replicated(),
            ),
            row(
                f"{layer_m}self_attention.linear_qkv.{part}",
                tuple(f"{layer_h}self_attn.{p}_proj.{part}" for p in "qkv"),
                qkv,
            ),
            row(
                (f"{layer_m}pre_mlp_layernorm.{part}", f"{layer_m}mlp.linear_fc1.layer_norm_{part}"),
                f"{layer_h}layer_norm2.{part}",
                Replicated(),
            ),
            row(f"{layer_m}mlp.linear_fc1.{part}", f"{layer_h}mlp.fc1.{part}", Column()),
        ]
    rows += [
        row(f"{layer_m}self_attention.linear_proj.weight", f"{layer_h}self_attn.out_proj.weight", Row()),
        row(f"{layer_m}self_attention.linear_proj.bias", f"{layer_h}self_attn.out_proj.bias", Replicated()),
        row(f"{layer_m}mlp.linear_fc2.weight", f"{layer_h}mlp.fc2.weight", Row()),
        row(f"{layer_m}mlp.linear_fc2.bias", f"{layer_h}mlp.fc2.bias", Replicated()),
    ]
    return tuple(rows)


def projector_rules() -> tuple[Rule, ...]:
    m, h = "vision_projection.encoder.", "multi_modal_projector."
    return (
        row(f"{m}linear_fc1.weight", f"{h}linear_1.weight", Column()),
        row(f"{m}linear_fc1.bias", f"{h}linear_1.bias", Column()),
        row(f"{m}linear_fc2.weight", f"{h}linear_2.weight", Row()),
        row(f"{m}linear_fc2.bias", f"{h}linear_2.bias", Replicated()),
    )


def llava_table(
    *,
    llm_heads: int,
    llm_groups: int,
    llm_head_dim: int,
    hf_vocab_rows: int,
    vit_heads: int,
    vit_head_dim: int,
    divisible_by: int = 128,
) -> Table:
    language = qwen2_rules(
        heads=llm_heads,
        groups=llm_groups,
        head_dim=llm_head_dim,
        hf_vocab_rows=hf_vocab_rows,
        divisible_by=divisible_by,
        megatron_prefix="language_model.",
        hf_prefix="language_model.",
    )
    vision = vision_rules(heads=vit_heads, head_dim=vit_head_dim)
    return Table(rules=language + vision + projector_rules())


def table_for(config, divisible_by: int = 128) -> Table:
    """The table for a transformers LlavaConfig (CLIP vision, Mistral text)."""
    text, vit = config.text_config, config.vision_config
    return llava_table(
        llm_heads=text.num_attention_heads,
        llm_groups=text.num_key_value_heads,
        llm_head_dim=text.head_dim,
        hf_vocab_rows=text.vocab_size,
        vit_heads=vit.num_attention_heads,
        vit_head_dim=vit.hidden_size // vit.num_attention_heads,
        divisible_by=divisible_by,
    )


def official_dtype(hf_name: str) -> torch.dtype:
    """Megatron-LM's recipe trains in bfloat16 (`--bf16`): every tensor."""
    return torch.bfloat16


IMAGE_TOKEN = "<image>"  # examples/multimodal's IMAGE_TOKEN (--special-tokens)


def _vit(name: str, hf: str) -> Field:
    return Field(name, write=lambda c, x, hf=hf: getattr(c.vision_config, hf))


# The args hf-to-megatron records: Megatron-LM's names for the recipe's model; the fields
# examples/multimodal/config.py fixes for CLIP (ViT sizes), the projector's shape and the image
# token id are recorded for our reader (`vision_*`, `projector_*`, `image_token_index`).
LLAVA_ARGS = ConfigTable(
    (
        from_context("tensor_model_parallel_size", "tp"),
        from_context("pipeline_model_parallel_size", "pp"),
        NUM_LAYERS,
        HIDDEN,
        FFN_HIDDEN,
        HEADS,
        Field(
            "group_query_attention",
            write=lambda c, x: x.text.num_key_value_heads != x.text.num_attention_heads,
        ),
        QUERY_GROUPS,
        Field("kv_channels", write=lambda c, x: x.text.head_dim),
        MAX_POSITIONS,
        Field("decoder_seq_length", write=lambda c, x: x.text.max_position_embeddings),
        constant("position_embedding_type", "rope"),
        ROTARY_BASE,
        constant("rotary_percent", 1.0),
        constant("use_rope_scaling", False),
        constant("normalization", "RMSNorm"),
        NORM_EPSILON,
        constant("swiglu", True),
        constant("add_bias_linear", False),
        constant("add_qkv_bias", False),
        constant("untie_embeddings_and_output_weights", True),
        from_context("vocab_size", "rows"),
        Field("padded_vocab_size", write=padded_rows),
        from_context("make_vocab_size_divisible_by", "divisible_by"),
        from_context("params_dtype", "dtype"),
        Field("bf16", write=lambda c, x: x.dtype == torch.bfloat16),
        Field("fp16", write=lambda c, x: x.dtype == torch.float16),
        constant("vision_model_type", "clip"),
        _vit("img_h", "image_size"),
        _vit("img_w", "image_size"),
        _vit("patch_dim", "patch_size"),
        Field(
            "disable_vision_class_token",
            write=lambda c, x: c.vision_feature_select_strategy == "default",
        ),
        constant("pixel_shuffle", False),
        constant("use_tile_tags", False),
        Field("special_tokens", write=lambda c, x: [IMAGE_TOKEN]),
        _vit("vision_num_layers", "num_hidden_layers"),
        _vit("vision_hidden_size", "hidden_size"),
        _vit("vision_ffn_hidden_size", "intermediate_size"),
        _vit("vision_num_attention_heads", "num_attention_heads"),
        _vit("vision_norm_epsilon", "layer_norm_eps"),
        Field("projector_ffn_hidden_size", write=lambda c, x: x.text.hidden_size),
        Field("projector_bias", write=lambda c, x: c.multimodal_projector_bias),
        Field("image_token_index", write=lambda c, x: c.image_token_index),
    ),
    text=lambda config: config.text_config,
)
