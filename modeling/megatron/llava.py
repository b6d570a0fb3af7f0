"""megatron-core's LLaVAModel as Megatron-LM's examples/multimodal builds its default LLaVA, from a
transformers LlavaConfig (CLIP vision, Mistral text): the Megatron side of the LLaVA family.

- language model: GPTModel, Mistral-shaped (GQA without QKV bias, SwiGLU, RMSNorm, RoPE, untied),
  Megatron-Core's local spec (builder.py's `language_layer_spec`);
- vision model: CLIPViTModel, subtype "clip" (class token, `ln_pre`, no `ln_post`), with
  LayerNorm layers, biases, quick-GELU and no attention mask, as examples/multimodal's
  `get_layer_spec(is_vit=True)`; `drop_vision_class_token` from the config's
  vision_feature_select_strategy;
- projector: `mlp`, fc1 -> GELU -> fc2, text-hidden wide, biases as the config says.

`llava_logits` runs in ranks started by `distributed.run_ranks`: it loads checkpoints the way
Megatron-LM does (a legacy rank file with load_state_dict(strict=True), a torch_dist folder with
dist_checkpointing.load) and calls LLaVAModel.forward with Megatron's own prompt convention: ONE
image token per image, which the model expands into the image's embeddings.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.models.vision import clip_vit_model
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from .builder import ParallelLayout, _runtime_kwargs, language_layer_spec


def language_config(config, layout: ParallelLayout, dtype: torch.dtype, cpu: bool) -> TransformerConfig:
    text = config.text_config
    return TransformerConfig(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        kv_channels=text.head_dim,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        pipeline_model_parallel_size=layout.pp,
        **_runtime_kwargs(layout, dtype, cpu),
    )


def vision_config(config, layout: ParallelLayout, dtype: torch.dtype, cpu: bool) -> TransformerConfig:
    vit = config.vision_config
    cfg = TransformerConfig(
        num_layers=vit.num_hidden_layers,
        hidden_size=vit.hidden_size,
        ffn_hidden_size=vit.intermediate_size,
        num_attention_heads=vit.num_attention_heads,
        num_query_groups=vit.num_attention_heads,
        kv_channels=vit.hidden_size // vit.num_attention_heads,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        normalization="LayerNorm",
        layernorm_epsilon=vit.layer_norm_eps,
        pipeline_model_parallel_size=1,  # the whole ViT lives on the first pipeline stage
        **_runtime_kwargs(layout, dtype, cpu),
    )
    cfg.vision_model_type = "clip"
    return cfg


def projector_config(config, layout: ParallelLayout, dtype: torch.dtype, cpu: bool) -> TransformerConfig:
    text = config.text_config
    return TransformerConfig(
        num_layers=1,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.hidden_size,  # transformers' projector is text-hidden wide
        num_attention_heads=text.num_attention_heads,  # unused by the MLP; must divide by TP
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, transformers' "gelu"
        add_bias_linear=config.multimodal_projector_bias,
        pipeline_model_parallel_size=1,
        **_runtime_kwargs(layout, dtype, cpu),
    )


def vision_layer_spec():
    """Megatron-Core's local layer spec with LayerNorm, attending without a mask (a ViT). Its
    sharded state dict names the norms as Transformer Engine does (`linear_qkv.layer_norm_*`), the
    names the recipe's TE run stores."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="LayerNorm"))
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
    return spec


@contextlib.contextmanager
def _buildable_ln_pre():
    """Without Transformer Engine, CLIPViTModel's default `ln_pre` is torch.nn.LayerNorm, which
    megatron-core's build_module cannot construct (it passes `config=`): build it as
    WrappedTorchNorm, the torch LayerNorm the ViT layers use. With TE nothing changes."""
    init = clip_vit_model.CLIPViTModel.__init__
    defaults = init.__defaults__
    if clip_vit_model.NORM_IMPL is torch.nn.LayerNorm:
        init.__defaults__ = tuple(WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in defaults)
    try:
        yield
    finally:
        init.__defaults__ = defaults


def build_llava_clip(
    config,
    layout: ParallelLayout,
    *,
    pp_rank: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    cpu: bool = True,
) -> LLaVAModel:
    """LLaVAModel for one pipeline stage (model-parallel state must be initialised); `vocab_size`
    is Megatron's padded vocab."""
    text, vit = config.text_config, config.vision_config
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    with _buildable_ln_pre():
        model = LLaVAModel(
            language_transformer_config=language_config(config, layout, dtype, cpu),
            language_transformer_layer_spec=language_layer_spec(use_te=False),
            language_vocab_size=vocab_size,
            language_max_sequence_length=text.max_position_embeddings,
            vision_transformer_config=vision_config(config, layout, dtype, cpu),
            vision_transformer_layer_spec=vision_layer_spec(),
            drop_vision_class_token=config.vision_feature_select_strategy == "default",
            vision_projection_config=projector_config(config, layout, dtype, cpu),
            vision_projection_layer_spec=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
            ),
            vision_projection_type="mlp",
            parallel_output=False,  # logits gathered over TP
            share_embeddings_and_output_weights=False,
            language_position_embedding_type="rope",
            language_rotary_percent=1.0,
            pre_process=first,
            post_process=last,
            add_encoder=first,
            add_decoder=True,
            img_h=vit.image_size,
            img_w=vit.image_size,
            patch_dim=vit.patch_size,
            language_rotary_base=int(text.rope_parameters["rope_theta"]),
            image_token_index=config.image_token_index,
        )
    return model.to(dtype)  # CLIPViT's conv1 ignores params_dtype


def load_llava(config, checkpoint: Path, *, tp: int, tp_rank: int, vocab_size: int) -> LLaVAModel:
    """This rank's model (PP=1) with the checkpoint loaded as Megatron-LM loads it."""
    from .checkpoint import load_legacy_state

    model = build_llava_clip(config, ParallelLayout(tp, 1), pp_rank=0, vocab_size=vocab_size).eval()
    iteration = Path(checkpoint) / "iter_0000001"
    if (iteration / "metadata.json").exists():
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load(model.sharded_state_dict(), str(iteration))
        state = {k: v for k, v in state.items() if k in model.state_dict()}
    else:
        state = load_legacy_state(Path(checkpoint), tp_rank=tp_rank, pp_rank=0, pp=1)
    model.load_state_dict(state, strict=True)
    return model


def llava_logits(
    rank: int, runs: list[tuple[dict, str, int]], prompts: list[tuple[torch.Tensor, torch.Tensor | None]]
):
    """In a rank started by run_ranks (TP=N, PP=1): for each (LlavaConfig dict, checkpoint, padded
    vocab) the logits of LLaVAModel.forward over the HF rows for every (ids with ONE image token
    per image, pixels or None) prompt, on rank 0; the error text where a load fails."""
    from megatron.core import parallel_state as ps
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from transformers import LlavaConfig

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    results = []
    for config_dict, checkpoint, vocab_size in runs:
        config = LlavaConfig.from_dict(config_dict)
        try:
            model = load_llava(config, Path(checkpoint), tp=tp, tp_rank=tp_rank, vocab_size=vocab_size)
        except (Exception, CheckpointException) as exc:  # reported by the caller (every rank fails alike)
            results.append(f"{type(exc).__name__}: {exc}"[:2000])
            continue
        side = config.vision_config.image_size
        outputs = []
        with torch.no_grad():
            for input_ids, pixels in prompts:
                images = pixels if pixels is not None else torch.zeros(0, 3, side, side)
                logits, _ = model(images=images, input_ids=input_ids, position_ids=None, attention_mask=None)
                outputs.append(logits[..., : config.text_config.vocab_size].float().clone())
        results.append(outputs if rank == 0 else None)
    return results
