"""The NVLM-D family: Megatron-LM examples/multimodal's NVLM-D (InternViT + MLP projector + Qwen2)
<-> our NVLM_D model class (modeling/, remote code beside the weights). Rows: mappings/nvlm_d.py."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from mappings.megatron_args import (
    NVLM_1_0,
    arg,
    check_args_against_tensors,
    decoder_fields,
    decoder_structure,
    generation_of,
    padded_head_count,
    padded_vocab_size,
    true_vocab,
)
from mappings.megatron_args import hf_vocab_rows as release_rows
from mappings.nvlm_d import NVLM_D_ARGS
from mappings.nvlm_d import official_dtype as nvlm_official_dtype
from mappings.nvlm_d import table_for as nvlm_table_for
from mappings.table import Table

from ..reference_config import NVLM_D_FIELDS
from ..tokenizer_folder import TokenizerInfo
from .base import CheckpointTensors, Family, record_special_tokens

# copied verbatim beside the weights (remote code): they import no nvlm-port module
REMOTE_CODE = (
    "configuration_nvlm_d.py",
    "modeling_nvlm_d.py",
    "modeling_intern_vit.py",
    "processing_nvlm_d.py",
)


class NVLMD(Family):
    name = "nvlm-d"
    architecture = "NVLM_D"  # what the release's config.json says, and what vLLM selects its model by
    # the model card (converter/model_card.py)
    card_title = "NVLM-D (InternViT vision tower, MLP projector, Qwen2 language model)"
    pipeline_tag = "image-text-to-text"
    auto_class = "AutoModel"
    card_tags = ("custom_code",)  # loads with trust_remote_code=True (the files beside the weights)
    reference_fields = NVLM_D_FIELDS  # --reference-config: what agrees, what is copied
    image_token = "<|vision_pad|>"  # the placeholder the release's img_context_token_id names
    pipelined_stack = "language_model.decoder.layers."  # the vision tower lives on the first stage
    hf_model_types = ("NVLM_D",)

    @staticmethod
    def detect(args) -> bool:
        return getattr(args, "vision_model_type", None) is not None

    @staticmethod
    def hf_config(args, *, ckpt=None, tokenizer=None, vision_real_heads=None):
        """The NVLM_D_Config of a checkpoint: sizes from its tensors (`ckpt`) where they are certain,
        the rest from its args through the generation table (mappings/megatron_args.py); the
        image placeholder and special ids from the tokenizer (a TokenizerInfo)."""
        tokenizer = tokenizer or TokenizerInfo()
        config = config_from_args(
            args,
            tensors=CheckpointTensors(ckpt) if ckpt is not None else None,
            tokenizer_vocab=tokenizer.size,
            vision_real_heads=vision_real_heads,
        )
        config.architectures = [NVLMD.architecture]
        if tokenizer.image_token_id is not None:
            config.img_context_token_id = tokenizer.image_token_id
        record_special_tokens(config.llm_config, tokenizer)
        return config

    @staticmethod
    def config_class():
        from modeling import NVLM_D_Config

        return NVLM_D_Config

    @staticmethod
    def table(config, divisible_by: int = 128) -> Table:
        return nvlm_table_for(config, divisible_by)

    @staticmethod
    def expected(config) -> dict[str, tuple[int, ...]]:
        from modeling import NVLM_D_Model

        with torch.device("meta"):
            model = NVLM_D_Model(config)
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}

    official_dtype = staticmethod(nvlm_official_dtype)

    @staticmethod
    def megatron_args(
        config, tp: int, pp: int, *, dtype: torch.dtype, divisible_by: int, tokenizer_vocab: int | None = None
    ):
        """mappings/nvlm_d.py's NVLM_D_ARGS table; Megatron pads from the HF row count here, so no
        row is lost on the way back."""
        rows = config.llm_config.vocab_size
        return NVLM_D_ARGS.to_args(
            config,
            tp=tp,
            pp=pp,
            padded_vocab=padded_vocab_size(rows, tp, divisible_by),
            divisible_by=divisible_by,
            dtype=dtype,
            spec="local",
            tokenizer_vocab=tokenizer_vocab or rows,
        )

    @staticmethod
    def write_extras(folder: Path, config) -> None:
        """config.json with auto_map, the remote-code files, generation config, and processing in
        transformers' terms: preprocessor_config.json (AutoImageProcessor -> GotOcr2ImageProcessor,
        tiles equal to ours), processor_config.json (AutoProcessor -> our NVLMProcessor, remote code)
        and chat_template.jinja (chat()'s prompt; it wins over a template in tokenizer_config.json)."""
        import modeling
        from modeling.processing_nvlm_d import CHAT_TEMPLATE, IMG_CONTEXT_TOKEN, NVLMImageProcessor

        config.save_pretrained(folder)
        source = Path(modeling.__file__).parent
        for name in REMOTE_CODE:
            shutil.copyfile(source / name, folder / name)
        eos = config.llm_config.eos_token_id
        generation = {
            "do_sample": False,
            "eos_token_id": eos,
            "max_new_tokens": 1024,
            "pad_token_id": config.llm_config.pad_token_id,
            "bos_token_id": config.llm_config.bos_token_id,
        }
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        processor = NVLMImageProcessor(
            image_size=config.image_size, max_num=config.max_dynamic_patch, use_thumbnail=config.use_thumbnail
        )
        auto_map = {"AutoProcessor": "processing_nvlm_d.NVLMProcessor"}
        preprocessor = {**processor.to_dict(), "processor_class": "NVLMProcessor", "auto_map": auto_map}
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        processor_config = {
            "processor_class": "NVLMProcessor",
            "auto_map": auto_map,
            "num_image_token": config.num_image_token,
            "image_token": IMG_CONTEXT_TOKEN,
        }
        (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# --- the NVLM_D_Config of a checkpoint: sizes from the tensors, the rest from args -----------------

# What examples/multimodal/config.py fixes per --vision-model-type instead of storing it; used
# only where the tensors cannot tell (the real head count and the norm epsilon).
VISION_MODEL_TYPES = {
    "internvit": dict(real_heads=25, layer_norm_eps=1e-6),
    "internvit300M": dict(real_heads=16, layer_norm_eps=1e-6),
}


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
    from modeling.configuration_nvlm_d import NVLM_D_Config

    vocab = true_vocab(args, tokenizer_vocab)
    rows = hf_vocab_rows or release_rows(vocab, 128)
    llm = decoder_fields(args)
    if tensors is not None:
        vit = vision_structure(args, tensors, real_heads=vision_real_heads)
        llm.update(decoder_structure(tensors, llm))
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


# ViT args that state a size the tensors also fix, only in our own writer's args: (ViT arg, derived
# ViT size). NVLM-1.0's `encoder_num_layers` is the LLM's depth, so it is never read as the ViT's.
_VIT_ARGS = (
    ("vision_hidden_size", "hidden_size"),
    ("vision_ffn_hidden_size", "intermediate_size"),
    ("vision_num_attention_heads", "megatron_heads"),
)
