"""Megatron-LM `args` <-> HF config, as data: the args names of each Megatron-LM generation, one
config table per family (both directions), and the padding rules Megatron applies at a TP size.

No model code and no megatron import: the converter and modeling/megatron both read
it. A `Field` is one args entry: the name our writer records, the HF config field it equals (if
any), how to write it from the HF config where it is not a plain copy, and how to read it back.
A `ConfigTable` is a family's ordered fields: `to_args` writes the args Namespace in that order
(the order is part of the legacy rank files' bytes), `to_hf` reads every HF field it names.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

# --- the args names each Megatron-LM generation stores ------------------------------------------
#
# ONE table of the args fields the converter reads, with the name each Megatron-LM generation
# stores it under. Measured on checkpoints NVIDIA's own code wrote (tests/fixtures/megatron-lm-*,
# tests/fixtures/nvlm10-recipe; docs/PORTING.md): megatron-core 0.19 builds its args from
# TransformerConfig, so `--norm-epsilon` is stored as `layernorm_epsilon`; NVLM-1.0's multimodal
# args never store the ViT sizes (they are derived from the tensors).
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
    # multimodal (examples/multimodal); NVLM-1.0 stores no ViT size
    "vision_model_type": {},
    "img_h": {},
    "patch_dim": {},
    "pixel_shuffle": {},
    "max_num_tiles": {},
    "use_thumbnail": {},
    # fields only nvlm-port's writer records; defaults apply elsewhere
    "vision_num_real_attention_heads": {},
    "vision_norm_epsilon": {},
    "projector_layer_norm_eps": {},
    "image_token_id": {},
}
_ALL_NAMES = {canonical: (canonical, *renamed.values()) for canonical, renamed in ARG_NAMES.items()}


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
    for name in _ALL_NAMES.get(canonical, (canonical,)):
        value = getattr(args, name, None)
        if value is not None:
            return value
    if default is ...:
        names = " / ".join(_ALL_NAMES.get(canonical, (canonical,)))
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


# --- padding rules (each has this one home) ------------------------------------------------------


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron-LM's rule: the embedding rows are the vocab rounded up to a multiple of
    divisible_by * TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def padded_head_count(real_heads: int, tp: int) -> int:
    """ViT heads Megatron-LM allocates at tensor parallel size `tp`: zero heads are appended so
    that TP divides the count: ((real - 1) // tp + 1) * tp (25 -> 25, 26, 28, 32 at TP 1, 2, 4, 8)."""
    return ((real_heads - 1) // tp + 1) * tp


QWEN25_TOKENIZER, QWEN25_ROWS = 151665, 152064  # the Qwen2.5 tokenizer's entries / Qwen2's embedding rows


def hf_vocab_rows(tokenizer_vocab: int, multiple: int = 1) -> int:
    """HF embedding rows for a tokenizer: Qwen2's 152064 for the Qwen2.5 tokenizer (the release),
    else the tokenizer's size rounded up to `multiple`."""
    if tokenizer_vocab == QWEN25_TOKENIZER:
        return QWEN25_ROWS
    return -(-tokenizer_vocab // multiple) * multiple


# --- the table type ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One args entry. Written as `write(config, context)` where given, else the HF field `hf` of
    the table's text config copied; read back (args -> HF field `hf`) as `read(args)` where given,
    else `arg(args, name)` (every generation's name). `hf=None`: no HF field holds it."""

    name: str
    hf: str | None = None
    write: Callable | None = None
    read: Callable | None = None

    def value_for(self, config, context):
        if self.write is not None:
            return self.write(config, context)
        return getattr(context.text, self.hf)

    def value_from(self, args):
        return self.read(args) if self.read is not None else arg(args, self.name)


def constant(name: str, value) -> Field:
    return Field(name, write=lambda config, context, value=value: value)


def from_context(name: str, key: str) -> Field:
    """An entry the conversion's options decide (TP, PP, dtype, ...), not the HF config."""
    return Field(name, write=lambda config, context, key=key: getattr(context, key))


@dataclass(frozen=True)
class ConfigTable:
    fields: tuple[Field, ...]
    text: Callable = staticmethod(lambda config: config)  # the HF config the plain copies read

    def to_args(self, config, **context) -> argparse.Namespace:
        """The args our writer records, in the table's order."""
        ctx = argparse.Namespace(text=self.text(config), **context)  # `text`: the table's text config
        return argparse.Namespace(**{f.name: f.value_for(config, ctx) for f in self.fields})

    def to_hf(self, args) -> dict:
        """Every HF field the table names, read from a checkpoint's args."""
        return {f.hf: f.value_from(args) for f in self.fields if f.hf is not None}


# --- the decoder fields every family's language model shares ---------------------------------------


def _kv_heads(args) -> int:
    if arg(args, "group_query_attention", False):
        return arg(args, "num_query_groups")
    return arg(args, "num_attention_heads")


NUM_LAYERS = Field("num_layers", "num_hidden_layers")
HIDDEN = Field("hidden_size", "hidden_size")
FFN_HIDDEN = Field("ffn_hidden_size", "intermediate_size")
HEADS = Field("num_attention_heads", "num_attention_heads")
QUERY_GROUPS = Field("num_query_groups", "num_key_value_heads", read=_kv_heads)
MAX_POSITIONS = Field("max_position_embeddings", "max_position_embeddings")
NORM_EPSILON = Field("norm_epsilon", "rms_norm_eps")
ROTARY_BASE = Field(
    "rotary_base",
    "rope_theta",
    write=lambda config, context: int(context.text.rope_parameters["rope_theta"]),
    read=lambda args: float(arg(args, "rotary_base")),
)
UNTIE = Field(
    "untie_embeddings_and_output_weights",
    "tie_word_embeddings",
    write=lambda config, context: not context.text.tie_word_embeddings,
    read=lambda args: not arg(args, "untie_embeddings_and_output_weights", False),
)
# the Qwen2-shaped decoder sizes args state (what `decoder_fields` reads)
DECODER = (
    NUM_LAYERS,
    HIDDEN,
    FFN_HIDDEN,
    HEADS,
    QUERY_GROUPS,
    MAX_POSITIONS,
    NORM_EPSILON,
    ROTARY_BASE,
    UNTIE,
)


def decoder_fields(args) -> dict:
    """The Qwen2Config / MistralConfig fields Megatron-LM's args of a GPT decoder determine."""
    return ConfigTable(DECODER).to_hf(args)


def padded_rows(config, context) -> int:
    """Megatron's padded vocab from the HF rows (`context.rows`): no row is lost on the way back."""
    return padded_vocab_size(context.rows, context.tp, context.divisible_by)


# --- args against the tensors ----------------------------------------------------------------------

# args fields that state a size the tensors also fix: (canonical arg, HF decoder field)
DECODER_SIZE_ARGS = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"),
)


def check_args_against_tensors(args, llm: dict, vit_pairs=(), vit: dict | None = None) -> None:
    """Refuse args that state a size the tensors contradict (a wrong or edited args, or the wrong
    rank files): the tensors are what gets converted, but a disagreement means something is off.
    `vit_pairs`: (args name, field of `vit`) of the vision sizes our writer's args state."""
    pairs = [(name, field, llm) for name, field in DECODER_SIZE_ARGS]
    pairs += [(name, field, vit) for name, field in vit_pairs]
    for name, field, derived in pairs:
        stated = arg(args, name, None) if name in ARG_NAMES else getattr(args, name, None)
        if stated is not None and stated != derived[field]:
            raise ValueError(f"args.{name} is {stated}, but the tensors give {derived[field]}")


def decoder_structure(tensors, fields: dict, prefix: str = "language_model.") -> dict:
    """Decoder sizes the tensors fix (layers counted from names, widths from shapes; a gated MLP's
    fc1 is twice the FFN width); args give the heads. `tensors` has `names` and `shape(name, tp_dim)`."""
    depth = prefix.count(".") + 2  # the layer number's position in the dotted name
    layers = {int(n.split(".")[depth]) for n in tensors.names if n.startswith(prefix + "decoder.layers.")}
    hidden = tensors.shape(prefix + "embedding.word_embeddings.weight", 0)[1]
    fc1 = tensors.shape(prefix + "decoder.layers.0.mlp.linear_fc1.weight", 0)[0]
    return dict(
        num_hidden_layers=max(layers) + 1 if layers else fields["num_hidden_layers"],
        hidden_size=hidden,
        intermediate_size=fc1 // 2,
        tie_word_embeddings=prefix + "output_layer.weight" not in tensors.names,
    )
