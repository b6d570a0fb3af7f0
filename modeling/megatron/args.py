"""Megatron-LM's `args` for an NVLM-D checkpoint, and the NVLM_D_Config they describe.

Pure Python (no megatron-core import): the converter reads checkpoints without Megatron.
`megatron_args(config, ...)` records what Megatron-LM records; `config_from_args(args)` is its
inverse, used to build the Megatron model of a checkpoint and to write the converted config.json.
"""

from __future__ import annotations

import argparse

import torch


def padded_head_count(real_heads: int, tp: int) -> int:
    """ViT heads Megatron-LM allocates at tensor parallel size `tp`: zero heads are appended so
    that TP divides the count: ((real - 1) // tp + 1) * tp (25 -> 25, 26, 28, 32 at TP 1, 2, 4, 8)."""
    return ((real_heads - 1) // tp + 1) * tp


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
    """The fields Megatron-LM records in `args`, for an NVLM-D model."""
    llm, vit = config.llm_config, config.vision_config
    return argparse.Namespace(
        # parallelism
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=None,
        encoder_tensor_model_parallel_size=0,
        encoder_pipeline_model_parallel_size=0,
        # language model (Qwen2)
        num_layers=llm.num_hidden_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.intermediate_size,
        num_attention_heads=llm.num_attention_heads,
        group_query_attention=llm.num_key_value_heads != llm.num_attention_heads,
        num_query_groups=llm.num_key_value_heads,
        kv_channels=llm.hidden_size // llm.num_attention_heads,
        max_position_embeddings=llm.max_position_embeddings,
        seq_length=llm.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(llm.rope_parameters["rope_theta"]),
        rotary_percent=1.0,
        use_rope_scaling=False,
        normalization="RMSNorm",
        norm_epsilon=llm.rms_norm_eps,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=True,
        untie_embeddings_and_output_weights=True,
        vocab_size=tokenizer_vocab,
        padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible_by,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        transformer_impl="transformer_engine" if spec == "te" else "local",
        tokenizer_prompt_format="qwen2p0",
        # vision model (InternViT) and projector
        vision_model_type="internvit",
        encoder_num_layers=vit.num_hidden_layers,
        vision_hidden_size=vit.hidden_size,
        vision_ffn_hidden_size=vit.intermediate_size,
        vision_num_attention_heads=padded_head_count(vit.num_attention_heads, layout.tp),
        vision_num_real_attention_heads=vit.num_attention_heads,
        vision_kv_channels=vit.head_dim,
        vision_norm_epsilon=vit.layer_norm_eps,
        img_h=config.image_size,
        img_w=config.image_size,
        patch_dim=vit.patch_size,
        disable_vision_class_token=False,
        pixel_shuffle=config.downsample_ratio == 0.5,
        use_tile_tags=True,
        max_num_tiles=config.max_dynamic_patch,
        use_thumbnail=config.use_thumbnail,
        use_tiling=True,
        special_tokens=["<image>"],
        image_tag_type="nvlm",
        vision_projection_type="mlp",
        projector_ffn_hidden_size=llm.intermediate_size,
        projector_layer_norm_eps=config.projector_layer_norm_eps,
        # not a Megatron-LM field: the <|vision_pad|> id of the tokenizer, recorded for convenience
        image_token_id=config.img_context_token_id,
    )


def qwen2_fields(args: argparse.Namespace) -> dict:
    """The Qwen2Config fields Megatron-LM's args of a Qwen2 decoder determine."""
    return dict(
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.norm_epsilon,
        rope_theta=float(args.rotary_base),
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
    )


def config_from_args(args: argparse.Namespace, *, hf_vocab_rows: int | None = None):
    """The NVLM_D_Config of a checkpoint written with `megatron_args` (or by Megatron-LM with the
    same fields). The HF embedding rows default to the release's rule: Qwen2's 152064 for the
    Qwen2.5 tokenizer, else the tokenizer vocab rounded up to a multiple of 128."""
    from ..configuration_nvlm_d import NVLM_D_Config

    vocab = getattr(args, "vocab_size", None) or args.padded_vocab_size
    rows = hf_vocab_rows or (152064 if vocab == 151665 else -(-vocab // 128) * 128)
    real_heads = getattr(args, "vision_num_real_attention_heads", None) or 25
    image = args.img_h
    return NVLM_D_Config(
        force_image_size=image,
        downsample_ratio=0.5 if args.pixel_shuffle else 1.0,
        max_dynamic_patch=args.max_num_tiles,
        use_thumbnail=args.use_thumbnail,
        projector_layer_norm_eps=getattr(args, "projector_layer_norm_eps", 1e-6),
        img_context_token_id=getattr(args, "image_token_id", None) or (151654 if vocab == 151665 else None),
        vision_config=dict(
            architectures=["InternVisionModel"],
            image_size=image,
            patch_size=args.patch_dim,
            hidden_size=args.vision_hidden_size,
            num_attention_heads=real_heads,
            num_dummy_heads=max(args.vision_num_attention_heads, padded_head_count(real_heads, 8))
            - real_heads,
            intermediate_size=args.vision_ffn_hidden_size,
            num_hidden_layers=args.encoder_num_layers,
            layer_norm_eps=args.vision_norm_epsilon,
        ),
        llm_config=dict(
            architectures=["Qwen2ForCausalLM"],
            model_type="llama",
            **qwen2_fields(args),
            hidden_act="silu",
            attention_bias=bool(args.add_qkv_bias),
            vocab_size=rows,
        ),
    )
