"""The LLaVA family: Megatron-LM examples/multimodal's default model <-> transformers' own
LlavaForConditionalGeneration (CLIPVisionModel + multi-modal projector + MistralForCausalLM).

The recipe (`pretrain_mistral_clip.sh`, `model.py`, `config.py`): `--vision-model-type clip` (a CLIP
ViT whose sizes config.py fixes instead of storing them), the `mlp` projector (fc1 -> GELU -> fc2),
a Mistral-shaped GPT (`--swiglu --normalization RMSNorm --group-query-attention
--disable-bias-linear --position-embedding-type rope --untie-embeddings-and-output-weights`) and
`--disable-vision-class-token`. Sizes come from the tensors where they are certain, the rest from
args; what maps to what is in mappings/llava.py.
"""

from __future__ import annotations

import torch

from mappings.llava import IMAGE_TOKEN, LLAVA_ARGS, table_for
from mappings.llava import official_dtype as llava_official_dtype
from mappings.megatron_args import (
    arg,
    check_args_against_tensors,
    decoder_fields,
    decoder_structure,
    true_vocab,
)
from mappings.table import Table

from ..tokenizer_folder import TokenizerInfo
from .base import CheckpointTensors, Family, record_special_tokens

# examples/multimodal/config.py, --vision-model-type clip (CLIP ViT-L/14): not stored in args.
CLIP_RECIPE = dict(hidden_size=1024, num_attention_heads=16)
VISION = "vision_model."
PROJECTOR = "vision_projection.encoder."


class LLaVA(Family):
    name = "llava"
    card_title = (
        "LLaVA (CLIP ViT, MLP projector, Mistral language model; transformers' LlavaForConditionalGeneration)"
    )
    pipeline_tag = "image-text-to-text"
    auto_class = "AutoModelForImageTextToText"
    card_tags = ()
    image_token = IMAGE_TOKEN
    pipelined_stack = "language_model.decoder.layers."  # the vision tower lives on the first stage
    hf_model_types = ("llava",)

    @staticmethod
    def detect(args) -> bool:
        return getattr(args, "vision_model_type", None) == "clip"

    @staticmethod
    def hf_config(args, *, ckpt=None, tokenizer=None, vision_real_heads=None):
        """The LlavaConfig of a checkpoint: sizes from its tensors (`ckpt`) where they are certain,
        else from args (our writer's); the ViT heads from args, the recipe's CLIP, or
        `vision_real_heads`; the image token from the tokenizer, else from our writer's args."""
        from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

        _require_recipe(args)
        tokenizer = tokenizer or TokenizerInfo()
        tensors = CheckpointTensors(ckpt) if ckpt is not None else None
        text = decoder_fields(args)
        text["head_dim"] = (
            arg(args, "kv_channels", None) or text["hidden_size"] // text["num_attention_heads"]
        )
        vit = _vision_fields(args, tensors, vision_real_heads)
        projector = _projector_fields(args, tensors)
        if tensors is not None:
            text.update(decoder_structure(tensors, text))
            check_args_against_tensors(args, text, _VIT_ARGS, vit)
        if text.pop("tie_word_embeddings"):
            raise ValueError(
                "tied embeddings: the recipe unties them (--untie-embeddings-and-output-weights)"
            )
        if projector["in"] != vit["hidden_size"] or projector["hidden"] != text["hidden_size"]:
            raise ValueError(
                f"the projector maps {projector['in']} -> {projector['hidden']} -> {text['hidden_size']}, "
                f"but LlavaForConditionalGeneration's maps {vit['hidden_size']} -> {text['hidden_size']} -> "
                f"{text['hidden_size']} (its hidden width is the LLM's)"
            )
        rows = true_vocab(args, tokenizer.size)
        image_token = tokenizer.image_token_id
        if image_token is None:
            image_token = getattr(args, "image_token_index", None)
        if image_token is None:
            raise ValueError(
                f"the {LLaVA.image_token} token id is unknown: pass --tokenizer DIR (one with it)"
            )
        if not 0 <= image_token < rows:
            raise ValueError(f"the image token id {image_token} is outside the {rows}-row vocabulary")
        drop_class_token = bool(getattr(args, "disable_vision_class_token", False))
        patches = (vit["image_size"] // vit["patch_size"]) ** 2
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(**vit, hidden_act="quick_gelu"),
            text_config=MistralConfig(**text, vocab_size=rows, hidden_act="silu", sliding_window=None),
            image_token_index=image_token,
            image_seq_length=patches + (0 if drop_class_token else 1),
            projector_hidden_act="gelu",
            vision_feature_layer=-1,  # CLIPViTModel feeds its last layer to the projector
            vision_feature_select_strategy="default" if drop_class_token else "full",
            multimodal_projector_bias=projector["bias"],
            tie_word_embeddings=False,
            architectures=["LlavaForConditionalGeneration"],
        )
        record_special_tokens(config.text_config, tokenizer)
        return config

    @staticmethod
    def config_class():
        from transformers import LlavaConfig

        return LlavaConfig

    @staticmethod
    def table(config, divisible_by: int = 128) -> Table:
        _require_convertible(config)
        return table_for(config, divisible_by)

    @staticmethod
    def expected(config) -> dict[str, tuple[int, ...]]:
        """Names and shapes as LlavaForConditionalGeneration's save_pretrained writes them (transformers
        renames a few prefixes on the way to disk; its own inverse mapping gives the file's names)."""
        from transformers import LlavaForConditionalGeneration
        from transformers.core_model_loading import revert_weight_conversion

        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        on_disk = revert_weight_conversion(model, model.state_dict())
        return {name: tuple(t.shape) for name, t in on_disk.items()}

    official_dtype = staticmethod(llava_official_dtype)

    @staticmethod
    def megatron_args(config, tp, pp, *, dtype, divisible_by, tokenizer_vocab=None):
        """Megatron-LM's names for the recipe's model; fields config.py fixes for CLIP (ViT sizes),
        the projector's shape and the image token id are recorded for our reader (`vision_*`,
        `projector_*`, `image_token_index`)."""
        _require_convertible(config)
        rows = config.text_config.vocab_size
        return LLAVA_ARGS.to_args(config, tp=tp, pp=pp, dtype=dtype, divisible_by=divisible_by, rows=rows)


# args of our writer that state a ViT size the tensors also fix
_VIT_ARGS = (
    ("vision_hidden_size", "hidden_size"),
    ("vision_ffn_hidden_size", "intermediate_size"),
    ("vision_num_layers", "num_hidden_layers"),
)


def _require_recipe(args) -> None:
    """Refuse args of a model this family does not describe (one line, naming the flag)."""
    wanted = (
        ("normalization", "RMSNorm", "--normalization RMSNorm"),
        ("swiglu", True, "--swiglu"),
        ("position_embedding_type", "rope", "--position-embedding-type rope"),
        ("add_qkv_bias", False, "no QKV bias (Mistral)"),
        ("pixel_shuffle", False, "no --pixel-shuffle"),
        ("use_tile_tags", False, "no --use-tile-tags"),
    )
    for field, value, flag in wanted:
        found = getattr(args, field, value)
        if found != value:
            raise ValueError(f"args.{field} is {found!r}; a LLaVA checkpoint of this recipe has {flag}")


def _vision_fields(args, tensors, heads_given: int | None) -> dict:
    """CLIPVisionConfig fields: widths from conv1 and fc1, depth from the layer names, the image
    side from args (checked against the position embeddings: patches + the class token)."""
    if tensors is None:
        hidden, patch = args.vision_hidden_size, args.patch_dim
        layers, ffn, positions = args.vision_num_layers, args.vision_ffn_hidden_size, None
    else:
        conv = tensors.shape(VISION + "conv1.weight", None)
        hidden, patch = conv[0], conv[-1]
        ids = {int(n.split(".")[3]) for n in tensors.names if n.startswith(VISION + "decoder.layers.")}
        if not ids:
            raise ValueError("no vision_model.decoder.layers.* tensors")
        layers = max(ids) + 1
        ffn = tensors.shape(VISION + "decoder.layers.0.mlp.linear_fc1.weight", 0)[0]
        positions = tensors.shape(VISION + "position_embeddings.weight", None)[0]
    side = getattr(args, "img_h", None)
    if side is None or getattr(args, "img_w", side) != side:
        raise ValueError(
            f"img_h {side} / img_w {getattr(args, 'img_w', None)}: a square image size is needed"
        )
    if positions is not None and positions != (side // patch) ** 2 + 1:
        raise ValueError(
            f"{positions} ViT position embeddings, but a {side}-pixel image of {patch}-pixel patches has "
            f"{(side // patch) ** 2} patches + 1 class token"
        )
    heads = heads_given or getattr(args, "vision_num_attention_heads", None)
    if heads is None and hidden == CLIP_RECIPE["hidden_size"]:
        heads = CLIP_RECIPE["num_attention_heads"]
    if heads is None or hidden % heads:
        raise ValueError(f"the ViT heads are unknown for hidden size {hidden}: pass --vision-real-heads N")
    return dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=side,
        patch_size=patch,
        layer_norm_eps=getattr(args, "vision_norm_epsilon", None) or _norm_epsilon(args),
    )


def _norm_epsilon(args) -> float:
    """examples/multimodal builds the ViT config from the same base config: the LLM's epsilon."""
    return arg(args, "norm_epsilon", 1e-5)


def _projector_fields(args, tensors) -> dict:
    """fc1's widths (in, hidden) and whether the projector has biases."""
    if tensors is None:
        return {
            "in": args.vision_hidden_size,
            "hidden": args.projector_ffn_hidden_size,
            "bias": args.projector_bias,
        }
    hidden, width_in = tensors.shape(PROJECTOR + "linear_fc1.weight", 0)
    return {"in": width_in, "hidden": hidden, "bias": PROJECTOR + "linear_fc1.bias" in tensors.names}


def _require_convertible(config) -> None:
    """An HF LlavaConfig the Megatron recipe's model can hold (else one line naming the field)."""
    text, vit = config.text_config, config.vision_config
    layer = config.vision_feature_layer
    checks = (
        (text.model_type == "mistral", f"text_config.model_type is {text.model_type!r}, not 'mistral'"),
        (
            vit.model_type == "clip_vision_model",
            f"vision_config.model_type is {vit.model_type!r}, not CLIP's",
        ),
        (
            vit.hidden_act == "quick_gelu",
            f"vision_config.hidden_act is {vit.hidden_act!r} (the recipe's CLIP: quick_gelu)",
        ),
        (
            layer in (-1, vit.num_hidden_layers),
            f"vision_feature_layer is {layer!r}: Megatron's CLIPViTModel feeds its last layer to the "
            "projector, so only -1 converts",
        ),
        (
            config.projector_hidden_act == "gelu",
            f"projector_hidden_act is {config.projector_hidden_act!r}, not 'gelu'",
        ),
        (not config.tie_word_embeddings, "tie_word_embeddings: the recipe unties them"),
        (
            text.sliding_window is None or text.sliding_window >= text.max_position_embeddings,
            f"text_config.sliding_window is {text.sliding_window}: the recipe attends to the whole sequence",
        ),
        (text.rope_parameters.get("rope_type", "default") == "default", "RoPE scaling: the recipe has none"),
    )
    for ok, why in checks:
        if not ok:
            raise ValueError(why)
