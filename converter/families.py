"""Model families the converter knows: each joins a mapping table to the model class it targets.

A family answers: is this Megatron checkpoint mine (from its args)? what HF config and which
tensors (names and shapes) does it convert to? which rows map them? which files besides the
weights does the HF folder need? Adding a model family = a table in mappings/ + a family here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mappings.nvlm_d import official_dtype as nvlm_official_dtype
from mappings.nvlm_d import table_for as nvlm_table_for
from mappings.qwen2 import qwen2_table_for
from mappings.table import Table

from .family_llava import LLaVA
from .reference_config import NVLM_D_FIELDS, QWEN2_FIELDS
from .tokenizer_folder import TokenizerInfo


def hf_vocab_rows(tokenizer_vocab: int) -> int:
    """HF embedding rows for a tokenizer: Qwen2's 152064 for the Qwen2.5 tokenizer (the release), the
    tokenizer's own size otherwise (what hf-to-megatron records in `vocab_size`)."""
    return 152064 if tokenizer_vocab == 151665 else tokenizer_vocab


def _record_special_tokens(text_config, tokenizer) -> None:
    """eos / bos / pad ids of the tokenizer into the config that generation reads them from (None
    left as is where the tokenizer has none): without eos, generate() runs to max_new_tokens."""
    for field in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, field)
        if value is not None:
            setattr(text_config, field, value)


class CheckpointTensors:
    """What the config derivation may ask of a checkpoint: its tensor names, a tensor's global
    shape and the global tensor, given how TP splits it (0 column, 1 row, None replicated)."""

    def __init__(self, ckpt):
        from mappings.transforms import Column, Replicated, Row

        self._ckpt = ckpt
        self._by_dim = {0: Column(), 1: Row(), None: Replicated()}
        self.names = set(ckpt.names())

    def shape(self, name: str, tp_dim: int | None) -> tuple[int, ...]:
        if name not in self.names:
            raise KeyError(f"the checkpoint has no {name}")
        return tuple(self._ckpt.shape(name, self._by_dim[tp_dim]))

    def read(self, name: str, tp_dim: int | None) -> torch.Tensor:
        return self._ckpt.read(name, self._by_dim[tp_dim])


REMOTE_CODE = (
    "configuration_nvlm_d.py",
    "modeling_nvlm_d.py",
    "modeling_intern_vit.py",
    "processing_nvlm_d.py",
)


@dataclass
class NVLMD:
    name = "nvlm-d"
    architecture = "NVLM_D"  # what the release's config.json says, and what vLLM selects its model by
    # the model card (converter/model_card.py)
    card_title = "NVLM-D (InternViT vision tower, MLP projector, Qwen2 language model)"
    pipeline_tag = "image-text-to-text"
    auto_class = "AutoModel"
    card_tags = ("custom_code",)  # loads with trust_remote_code=True (the files beside the weights)
    reference_fields = NVLM_D_FIELDS  # --reference-config: what agrees, what is copied

    @staticmethod
    def detect(args) -> bool:
        return getattr(args, "vision_model_type", None) is not None

    @staticmethod
    def hf_config(args, *, ckpt=None, tokenizer=None, vision_real_heads=None):
        """The NVLM_D_Config of a checkpoint: sizes from its tensors (`ckpt`) where they are certain,
        the rest from its args through the generation table (modeling/megatron/args.py); the
        image placeholder and special ids from the tokenizer (a TokenizerInfo)."""
        from modeling.megatron.args import config_from_args

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
        _record_special_tokens(config.llm_config, tokenizer)
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
        from types import SimpleNamespace

        from modeling.megatron.args import megatron_args

        rows = config.llm_config.vocab_size
        # Megatron pads from the HF row count here, so no row is lost on the way back.
        padded = -(-rows // (divisible_by * tp)) * (divisible_by * tp)
        return megatron_args(
            config,
            SimpleNamespace(tp=tp, pp=pp),
            padded_vocab=padded,
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


@dataclass
class Qwen2:
    """A plain Megatron GPT checkpoint of a Qwen2 model -> transformers' Qwen2ForCausalLM."""

    name = "qwen2"
    card_title = "A Qwen2 causal language model (transformers' Qwen2ForCausalLM)"
    pipeline_tag = "text-generation"
    auto_class = "AutoModelForCausalLM"
    card_tags = ()
    reference_fields = QWEN2_FIELDS

    @staticmethod
    def detect(args) -> bool:
        return getattr(args, "vision_model_type", None) is None

    @staticmethod
    def hf_config(args, *, ckpt=None, tokenizer=None, vision_real_heads=None):
        from transformers import Qwen2Config

        from modeling.megatron.args import check_args_against_tensors, qwen2_fields, true_vocab

        tokenizer = tokenizer or TokenizerInfo()
        vocab = true_vocab(args, tokenizer.size)
        fields = qwen2_fields(args)
        if ckpt is not None:  # the tensors are certain where args of some generations are not
            tensors = CheckpointTensors(ckpt)
            layers = {int(n.split(".")[2]) for n in tensors.names if n.startswith("decoder.layers.")}
            fields.update(
                num_hidden_layers=max(layers) + 1 if layers else fields["num_hidden_layers"],
                hidden_size=tensors.shape("embedding.word_embeddings.weight", 0)[1],
                tie_word_embeddings="output_layer.weight" not in tensors.names,
                intermediate_size=tensors.shape("decoder.layers.0.mlp.linear_fc1.weight", 0)[0] // 2,
            )
            check_args_against_tensors(args, fields)
        config = Qwen2Config(**fields, vocab_size=hf_vocab_rows(vocab), architectures=["Qwen2ForCausalLM"])
        _record_special_tokens(config, tokenizer)
        return config

    @staticmethod
    def config_class():
        from transformers import Qwen2Config

        return Qwen2Config

    @staticmethod
    def table(config, divisible_by: int = 128) -> Table:
        return Table(rules=qwen2_table_for(config, divisible_by))

    @staticmethod
    def expected(config) -> dict[str, tuple[int, ...]]:
        from transformers import Qwen2ForCausalLM

        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # not stored on either side
        return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}

    @staticmethod
    def official_dtype(name: str) -> torch.dtype:
        return torch.bfloat16

    @staticmethod
    def megatron_args(config, tp, pp, *, dtype, divisible_by, tokenizer_vocab=None):
        import argparse

        rows = config.vocab_size
        return argparse.Namespace(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            group_query_attention=True,
            num_query_groups=config.num_key_value_heads,
            kv_channels=config.hidden_size // config.num_attention_heads,
            max_position_embeddings=config.max_position_embeddings,
            norm_epsilon=config.rms_norm_eps,
            rotary_base=int(config.rope_parameters["rope_theta"]),
            swiglu=True,
            add_qkv_bias=True,
            add_bias_linear=False,
            untie_embeddings_and_output_weights=not config.tie_word_embeddings,
            vocab_size=rows,
            padded_vocab_size=-(-rows // (divisible_by * tp)) * (divisible_by * tp),
            make_vocab_size_divisible_by=divisible_by,
            params_dtype=dtype,
            normalization="RMSNorm",
            position_embedding_type="rope",
        )

    @staticmethod
    def write_extras(folder: Path, config) -> None:
        from transformers import GenerationConfig

        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)


FAMILIES = (LLaVA, NVLMD, Qwen2)  # first match wins: LLaVA's vision_model_type 'clip' before NVLM-D's any


def family_for_args(args):
    for family in FAMILIES:
        if family.detect(args):
            return family
    raise ValueError("no known model family")


def family_for_hf_config(config_json: dict):
    if config_json.get("model_type") == "llava":
        return LLaVA
    return NVLMD if config_json.get("model_type") == "NVLM_D" else Qwen2
