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


# --- reading args as Megatron-LM really stores them --------------------------------------------
#
# ONE table of the args fields the converter reads, with the name each Megatron-LM generation
# stores it under (None: that generation does not store it). Measured on checkpoints NVIDIA's own
# code wrote (tests/fixtures/megatron-lm-*, tests/fixtures/nvlm10-recipe; docs/PORTING.md):
# megatron-core 0.19 builds its args from TransformerConfig, so `--norm-epsilon` is stored as
# `layernorm_epsilon`; NVLM-1.0's multimodal args never store the ViT sizes (they are derived from
# the tensors, see `vision_structure`).
NVLM_1_0 = "NVLM-1.0 (Megatron-LM 2024)"
MCORE_016 = "megatron-core 0.16-0.18"
MCORE_019 = "megatron-core 0.19+"
GENERATIONS = (NVLM_1_0, MCORE_016, MCORE_019)

# canonical field -> {generation: the name that generation stores it under}. A generation not named
# stores the field under its canonical name; the reader accepts every name of a row.
ARG_NAMES: dict[str, dict[str, str]] = {
    # parallel layout
    "tensor_model_parallel_size": {},
    "pipeline_model_parallel_size": {},
    # language model
    "num_layers": {},
    "hidden_size": {},
    "ffn_hidden_size": {},
    "num_attention_heads": {},
    "group_query_attention": {},
    "num_query_groups": {},
    "kv_channels": {},
    "max_position_embeddings": {},
    "norm_epsilon": {MCORE_019: "layernorm_epsilon"},  # TransformerConfig's name since 0.19
    "apply_layernorm_1p": {MCORE_019: "layernorm_zero_centered_gamma"},
    "rotary_base": {},
    "untie_embeddings_and_output_weights": {},
    "add_qkv_bias": {},
    "vocab_size": {},  # None when --tokenizer decides (NVLM-1.0): then the tokenizer's size
    "padded_vocab_size": {},
    "make_vocab_size_divisible_by": {},
    # multimodal (examples/multimodal); NVLM-1.0 stores no ViT size: see vision_structure
    "vision_model_type": {},
    "img_h": {},
    "patch_dim": {},
    "pixel_shuffle": {},
    "max_num_tiles": {},
    "use_thumbnail": {},
    # fields only nvlm-port's writer records (megatron_args); defaults apply elsewhere
    "vision_num_real_attention_heads": {},
    "vision_norm_epsilon": {},
    "projector_layer_norm_eps": {},
    "image_token_id": {},
}
_ALL_NAMES = {canonical: (canonical, *renamed.values()) for canonical, renamed in ARG_NAMES.items()}

# What examples/multimodal/config.py fixes per --vision-model-type instead of storing it; used
# only where the tensors cannot tell (the real head count and the norm epsilon).
VISION_MODEL_TYPES = {
    "internvit": dict(real_heads=25, layer_norm_eps=1e-6),
    "internvit300M": dict(real_heads=16, layer_norm_eps=1e-6),
}


def generation_of(args) -> str:
    """Which Megatron-LM generation's names `args` use (for `inspect`)."""
    if hasattr(args, "layernorm_epsilon") and not hasattr(args, "norm_epsilon"):
        return MCORE_019
    model_type = getattr(args, "model_type", None)
    if getattr(model_type, "value", None) == 2:  # ModelType.encoder_and_decoder: gone in megatron-core 0.14
        return NVLM_1_0
    return MCORE_016


def arg(args, canonical: str, default=...):
    """The value of a canonical field under whichever name the checkpoint's generation stored it."""
    for name in _ALL_NAMES[canonical]:
        value = getattr(args, name, None)
        if value is not None:
            return value
    if default is ...:
        names = " / ".join(_ALL_NAMES[canonical])
        raise AttributeError(f"args have no {names}")
    return default


def true_vocab(args, tokenizer_vocab: int | None = None) -> int:
    """The tokenizer's entry count: args' vocab_size (plus the end-of-document token that
    Megatron-LM's NullTokenizer appended up to core_r0.17; since 0.18 eod is vocab_size - 1 and args
    carry `null_tokenizer_eod_id`), else the --tokenizer given (NVLM-1.0 stores None), else the
    padded rows."""
    stored = arg(args, "vocab_size", None)
    if stored is not None:
        appended_eod = getattr(args, "tokenizer_type", None) == "NullTokenizer" and not hasattr(
            args, "null_tokenizer_eod_id"
        )
        return stored + appended_eod
    return tokenizer_vocab or arg(args, "padded_vocab_size")


def qwen2_fields(args: argparse.Namespace) -> dict:
    """The Qwen2Config fields Megatron-LM's args of a Qwen2 decoder determine."""
    heads = arg(args, "num_attention_heads")
    groups = arg(args, "num_query_groups") if arg(args, "group_query_attention", False) else heads
    return dict(
        hidden_size=arg(args, "hidden_size"),
        intermediate_size=arg(args, "ffn_hidden_size"),
        num_hidden_layers=arg(args, "num_layers"),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        max_position_embeddings=arg(args, "max_position_embeddings"),
        rms_norm_eps=arg(args, "norm_epsilon"),
        rope_theta=float(arg(args, "rotary_base")),
        tie_word_embeddings=not arg(args, "untie_embeddings_and_output_weights", False),
    )


class AmbiguousCheckpoint(ValueError):
    """The checkpoint cannot tell a size; the message names the option that sets it."""


def vision_structure(args, tensors, *, real_heads: int | None = None) -> dict:
    """The ViT and projector sizes of an NVLM-D checkpoint, from its tensors (names and global shapes)
    where they are certain, else args / the known --vision-model-type, else `real_heads` (the
    user's --vision-real-heads). `tensors` has `names` and `shape(name, tp_dim)` (global shape) and
    `read(name, tp_dim)` (the global tensor)."""
    prefix = "vision_model."
    conv = tensors.shape(prefix + "conv1.weight", None)
    hidden, patch = conv[0], conv[2]
    layer_ids = {int(n.split(".")[3]) for n in tensors.names if n.startswith(prefix + "decoder.layers.")}
    if not layer_ids:
        raise AmbiguousCheckpoint("no vision_model.decoder.layers.* tensors")
    layer0 = prefix + "decoder.layers.0."
    ffn = tensors.shape(layer0 + "mlp.linear_fc1.weight", 0)[0]
    qk_norm = tensors.shape(layer0 + "self_attention.q_layernorm.weight", 0)[0]
    positions = tensors.shape(prefix + "position_embeddings.weight", None)[0]
    side = round((positions - 1) ** 0.5)
    vision_type = arg(args, "vision_model_type", None)
    known = VISION_MODEL_TYPES.get(vision_type, {})
    # head counts the shapes allow: hidden = real x head_dim, and the stored (padded) heads follow
    # Megatron's rule at the checkpoint's TP (NVLM-1.0 pads to a fixed 32 at any TP)
    tp = arg(args, "tensor_model_parallel_size", 1)
    fixed = {32} if generation_of(args) == NVLM_1_0 else set()
    candidates = [
        h
        for h in range(1, hidden + 1)
        if hidden % h == 0
        and qk_norm % (hidden // h) == 0
        and qk_norm // (hidden // h) in {padded_head_count(h, tp), *fixed}
    ]
    heads = real_heads or arg(args, "vision_num_real_attention_heads", None)
    how = "--vision-real-heads" if real_heads else "args"
    if heads is None and known.get("real_heads") in candidates:
        heads, how = known["real_heads"], f"--vision-model-type {vision_type}"
    if heads is None:
        qkv = layer0 + "self_attention.linear_qkv.weight"
        heads, how = _real_heads_from_zero_heads(tensors, qkv, candidates, hidden)
    if heads not in candidates:
        raise AmbiguousCheckpoint(
            f"{heads} real ViT heads do not fit hidden size {hidden} and QK-norm size {qk_norm}"
        )
    head_dim = hidden // heads
    projector_hidden, projector_in = tensors.shape("vision_projection.encoder.linear_fc1.weight", 0)
    return dict(
        hidden_size=hidden,
        patch_size=patch,
        image_size=arg(args, "img_h", side * patch),
        num_hidden_layers=max(layer_ids) + 1,
        intermediate_size=ffn,
        num_attention_heads=heads,
        megatron_heads=qk_norm // head_dim,
        head_dim=head_dim,
        real_heads_from=how,
        layer_norm_eps=arg(args, "vision_norm_epsilon", known.get("layer_norm_eps", 1e-6)),
        pixel_shuffle=projector_in == 4 * hidden,
        projector_hidden=projector_hidden,
    )


def _real_heads_from_zero_heads(tensors, qkv_name: str, candidates: list[int], hidden: int):
    """The real head count: the dummy heads Megatron appends are exactly zero. Among the head
    counts the shapes allow, the one whose heads past it are all zero and whose last head is not."""
    qkv = tensors.read(qkv_name, 0)
    fits = []
    for heads in candidates:
        head_dim = hidden // heads
        if qkv.shape[0] % (3 * head_dim):
            continue
        per_head = qkv.reshape(-1, 3 * head_dim, qkv.shape[1])
        nonzero = per_head.flatten(1).any(dim=1)
        if nonzero[:heads].all() and not nonzero[heads:].any():
            fits.append(heads)
    if len(fits) != 1:
        raise AmbiguousCheckpoint(
            f"cannot tell the real ViT heads from the checkpoint (head counts that fit: {fits or 'none'}); "
            "pass --vision-real-heads N"
        )
    return fits[0], "the zero dummy heads"


# The HF layout always has real + 7 dummy heads: the release, vLLM (num_dummy_heads=7 hard-coded)
# and the published remote code expect it, whatever padding the Megatron checkpoint had.
HF_DUMMY_HEADS = 7


def config_from_args(
    args: argparse.Namespace,
    *,
    hf_vocab_rows: int | None = None,
    tensors=None,
    tokenizer_vocab: int | None = None,
    vision_real_heads: int | None = None,
):
    """The NVLM_D_Config of a checkpoint. With `tensors` (what a converter reads), the ViT and LLM
    sizes come from the tensors' names and shapes; without, from the fields of our own writer's
    args (`megatron_args`). The HF embedding rows default to the release's rule: Qwen2's 152064 for
    the Qwen2.5 tokenizer, else the tokenizer vocab rounded up to a multiple of 128."""
    from ..configuration_nvlm_d import NVLM_D_Config

    vocab = true_vocab(args, tokenizer_vocab)
    rows = hf_vocab_rows or (152064 if vocab == 151665 else -(-vocab // 128) * 128)
    llm = qwen2_fields(args)
    if tensors is not None:
        vit = vision_structure(args, tensors, real_heads=vision_real_heads)
        llm.update(_llm_structure(tensors, llm))
        check_args_against_tensors(args, llm, _VIT_ARGS, vit)
        pixel_shuffle = vit["pixel_shuffle"]
    else:
        vit = dict(
            hidden_size=args.vision_hidden_size,
            patch_size=args.patch_dim,
            image_size=args.img_h,
            num_hidden_layers=args.encoder_num_layers,
            intermediate_size=args.vision_ffn_hidden_size,
            num_attention_heads=getattr(args, "vision_num_real_attention_heads", None) or 25,
            layer_norm_eps=args.vision_norm_epsilon,
        )
        pixel_shuffle = args.pixel_shuffle
    image = vit["image_size"]
    return NVLM_D_Config(
        force_image_size=image,
        downsample_ratio=0.5 if pixel_shuffle else 1.0,
        max_dynamic_patch=arg(args, "max_num_tiles", 6),
        use_thumbnail=arg(args, "use_thumbnail", True),
        projector_layer_norm_eps=arg(args, "projector_layer_norm_eps", 1e-6),
        img_context_token_id=arg(args, "image_token_id", None) or (151654 if vocab == 151665 else None),
        vision_config=dict(
            architectures=["InternVisionModel"],
            image_size=image,
            patch_size=vit["patch_size"],
            hidden_size=vit["hidden_size"],
            num_attention_heads=vit["num_attention_heads"],
            num_dummy_heads=HF_DUMMY_HEADS,
            intermediate_size=vit["intermediate_size"],
            num_hidden_layers=vit["num_hidden_layers"],
            layer_norm_eps=vit["layer_norm_eps"],
        ),
        llm_config=dict(
            architectures=["Qwen2ForCausalLM"],
            model_type="llama",
            **llm,
            hidden_act="silu",
            attention_bias=bool(arg(args, "add_qkv_bias", True)),
            vocab_size=rows,
        ),
    )


# args fields that state a size the tensors also fix: (canonical arg, Qwen2Config field) and, only
# in our own writer's args, (ViT arg, derived ViT size). NVLM-1.0's `encoder_num_layers` is the LLM's
# depth, so it is never read as the ViT's.
_LLM_ARGS = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"),
)
_VIT_ARGS = (
    ("vision_hidden_size", "hidden_size"),
    ("vision_ffn_hidden_size", "intermediate_size"),
    ("vision_num_attention_heads", "megatron_heads"),
)


def check_args_against_tensors(args, llm: dict, vit_pairs=(), vit: dict | None = None) -> None:
    """Refuse args that state a size the tensors contradict (a wrong or edited args, or the wrong
    rank files): the tensors are what gets converted, but a disagreement means something is off."""
    pairs = [(name, field, llm) for name, field in _LLM_ARGS]
    pairs += [(name, field, vit) for name, field in vit_pairs]
    for name, field, derived in pairs:
        stated = arg(args, name, None) if name in ARG_NAMES else getattr(args, name, None)
        if stated is not None and stated != derived[field]:
            raise ValueError(f"args.{name} is {stated}, but the tensors give {derived[field]}")


def _llm_structure(tensors, fields: dict, prefix: str = "language_model.") -> dict:
    """LLM sizes the tensors fix (layers counted from names, widths from shapes); args give heads."""
    layers = {int(n.split(".")[3]) for n in tensors.names if n.startswith(prefix + "decoder.layers.")}
    hidden = tensors.shape(prefix + "embedding.word_embeddings.weight", 0)[1]
    fc1 = tensors.shape(prefix + "decoder.layers.0.mlp.linear_fc1.weight", 0)[0]
    return dict(
        num_hidden_layers=max(layers) + 1 if layers else fields["num_hidden_layers"],
        hidden_size=hidden,
        intermediate_size=fc1 // 2,
        tie_word_embeddings=prefix + "output_layer.weight" not in tensors.names,
    )
