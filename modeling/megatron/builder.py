"""Turn an NVLM_D_Config into megatron-core's LLaVAModel, configured as NVLM-D (run with 0.16.1,
the pin, and 0.19.x, current Megatron-LM: README, "megatron-core versions run").

- language model: GPTModel with Qwen2 layers (GQA with QKV bias, SwiGLU, RMSNorm, RoPE, untied
  embeddings); Megatron-Core's local spec by default, the Transformer Engine spec when TE is
  importable and asked for;
- vision model: CLIPViTModel, subtype "internvit", with this project's InternViT layer spec
  (padded heads, TP-wide QK-norm, layer scale; see internvit.py);
- projector: LayerNorm (eps from the config) -> fc1 -> GELU -> fc2, no biases (projector.py);
- pixel shuffle and tile tags: LLaVAModel's own (the tags are token ids of `<tile_k>`).

Pipeline parallelism splits the LLM layers evenly; the vision model and projector live on the
first stage, as in Megatron-LM's NVLM recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.transformer.transformer_config import TransformerConfig

from mappings.megatron_args import padded_vocab_size  # noqa: F401  (re-exported: callers import it here)

from .args import padded_head_count
from .internvit import internvit_layer_spec
from .projector import projector_submodules

TILE_TAGS = [f"<tile_{i}>" for i in range(1, 7)] + ["<tile_global_thumbnail>"]


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    """Init method that leaves the tensor as allocated: weights are written afterwards
    (weights.py or a checkpoint). Initialisation still runs so that Megatron marks every
    parameter with its tensor-parallel layout (partition_dim, partition_stride)."""
    return tensor


def _runtime_kwargs(layout: ParallelLayout, dtype: torch.dtype, cpu: bool) -> dict:
    return dict(
        tensor_model_parallel_size=layout.tp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        init_method=_keep,
        output_layer_init_method=_keep,
        attention_softmax_in_fp32=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels need CUDA (and some need apex/TE); the unfused paths compute the same math.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        deterministic_mode=cpu,
    )


def language_config(config, layout: ParallelLayout, dtype: torch.dtype, cpu: bool) -> TransformerConfig:
    llm = config.llm_config
    return TransformerConfig(
        num_layers=llm.num_hidden_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.intermediate_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_key_value_heads,
        kv_channels=llm.hidden_size // llm.num_attention_heads,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        normalization="RMSNorm",
        layernorm_epsilon=llm.rms_norm_eps,
        pipeline_model_parallel_size=layout.pp,
        **_runtime_kwargs(layout, dtype, cpu),
    )


def vision_config(config, layout: ParallelLayout, dtype: torch.dtype, cpu: bool) -> TransformerConfig:
    vit = config.vision_config
    heads = padded_head_count(vit.num_attention_heads, layout.tp)
    cfg = TransformerConfig(
        num_layers=vit.num_hidden_layers,
        hidden_size=vit.hidden_size,
        ffn_hidden_size=vit.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=vit.head_dim,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU
        add_bias_linear=True,
        add_qkv_bias=False,
        qk_layernorm=True,
        normalization="RMSNorm",
        layernorm_epsilon=vit.layer_norm_eps,
        pipeline_model_parallel_size=1,  # the whole ViT lives on the first pipeline stage
        **_runtime_kwargs(layout, dtype, cpu),
    )
    cfg.vision_model_type = "internvit"
    return cfg


def projector_config(config, layout: ParallelLayout, dtype: torch.dtype, cpu: bool) -> TransformerConfig:
    llm = config.llm_config
    return TransformerConfig(
        num_layers=1,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.intermediate_size,
        num_attention_heads=llm.num_attention_heads,  # unused by the MLP; must divide by TP
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=False,
        layernorm_epsilon=config.projector_layer_norm_eps,
        pipeline_model_parallel_size=1,
        **_runtime_kwargs(layout, dtype, cpu),
    )


def language_layer_spec(use_te: bool = False):
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_llava(
    config,
    layout: ParallelLayout,
    *,
    pp_rank: int,
    vocab_size: int,
    tile_tag_ids: list[list[int]],
    image_token_index: int,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    cpu: bool = True,
) -> LLaVAModel:
    """LLaVAModel for one pipeline stage (model-parallel state must be initialised).

    `vocab_size` is Megatron's padded vocab; `tile_tag_ids` the token ids of TILE_TAGS (5 each).
    `use_te` None: the LLM layers use Transformer Engine's spec when TE is importable (never on a
    CPU-only host), Megatron-Core's local spec otherwise.
    """
    if use_te is None:
        use_te = not cpu and te_available()
    llm = config.llm_config
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    model = LLaVAModel(
        language_transformer_config=language_config(config, layout, dtype, cpu),
        language_transformer_layer_spec=language_layer_spec(use_te),
        language_vocab_size=vocab_size,
        language_max_sequence_length=llm.max_position_embeddings,
        vision_transformer_config=vision_config(config, layout, dtype, cpu),
        vision_transformer_layer_spec=internvit_layer_spec(config.vision_config.num_attention_heads),
        drop_vision_class_token=True,
        vision_projection_config=projector_config(config, layout, dtype, cpu),
        vision_projection_layer_spec=projector_submodules(),
        vision_projection_type="mlp",
        parallel_output=False,  # logits gathered over TP
        share_embeddings_and_output_weights=False,
        language_position_embedding_type="rope",
        language_rotary_percent=1.0,
        pre_process=first,
        post_process=last,
        add_encoder=first,
        add_decoder=True,
        img_h=config.image_size,
        img_w=config.image_size,
        patch_dim=config.vision_config.patch_size,
        language_rotary_base=int(llm.rope_parameters["rope_theta"]),
        image_token_index=image_token_index,
        pixel_shuffle=config.downsample_ratio == 0.5,
        tile_tags=tile_tag_ids,
        max_num_tiles=config.max_dynamic_patch + int(config.use_thumbnail),
        tokenizer_type="qwen2p0",
    )
    # A few submodules (CLIPViT's conv1) ignore params_dtype; Megatron-LM casts the whole model
    # (Float16Module) the same way.
    return model.to(dtype)
