"""`megatron-to-hf --reference-config FILE`: the release's fields a Megatron checkpoint does not carry.

A Megatron checkpoint holds the weights and the args that shaped them; the published release's
config.json also holds fields no args record: `rope_scaling` (NVLM-D-72B: dynamic, factor 3),
processing settings, generation defaults, and beside it a model card with license and base model.
Given the release's config.json (or the folder holding it), the conversion copies those fields,
and checks that every structural field the release states (sizes, heads, layers, vocab, eps, rope
base...) agrees with what the checkpoint says: a disagreement means the reference describes
another model, and the conversion stops before writing anything.

Each field is a row of a declarative table (as Megatron-Bridge maps configs field by field):

- AGREE: fixed by the checkpoint; the reference must state the same value (or not state it);
- COPY: the reference's value goes into config.json (ours is a default, not a fact);
- GENERATION: goes into generation_config.json (sampling-only flags only when sampling is on:
  transformers refuses `top_k`/`top_p` on a greedy config, and they would change nothing);
- CARD: the model card's front matter (license, base model);
- OURS: written from the checkpoint, the tokenizer or the options (`--dtype`); the reference's
  value is not taken.

Fields of the reference in no row (transformers' serialisation defaults such as `id2label`,
`_name_or_path`, `transformers_version`) are not copied.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError

AGREE, COPY, GENERATION, CARD, OURS = "agree", "copy", "generation", "card", "ours"


@dataclass(frozen=True)
class Row:
    path: tuple[str, ...]  # keys into config.json (a sub-config first where there is one)
    rule: str
    why: str = ""


def _rows(prefix: tuple[str, ...], rule: str, names: str, why: str = "") -> tuple[Row, ...]:
    return tuple(Row((*prefix, name), rule, why) for name in names.split())


def _language_model_rows(prefix: tuple[str, ...]) -> tuple[Row, ...]:
    return (
        *_rows(
            prefix,
            AGREE,
            "architectures hidden_size intermediate_size num_hidden_layers num_attention_heads "
            "num_key_value_heads head_dim vocab_size rms_norm_eps rope_theta max_position_embeddings "
            "hidden_act tie_word_embeddings attention_bias",
            "the checkpoint's tensors and args fix it",
        ),
        Row((*prefix, "rope_scaling"), COPY, "no Megatron args record it (the release: dynamic, x3)"),
        *_rows(
            prefix, GENERATION, "do_sample temperature top_k top_p repetition_penalty", "generation default"
        ),
        *_rows(prefix, OURS, "eos_token_id bos_token_id pad_token_id", "the tokenizer given decides"),
        *_rows(prefix, OURS, "torch_dtype dtype", "--dtype decides"),
    )


NVLM_D_FIELDS = (
    *_rows(
        (),
        AGREE,
        "model_type downsample_ratio ps_version select_layer force_image_size",
        "the model's function",
    ),
    *_rows((), AGREE, "projector_layer_norm_eps", "the checkpoint's args decide (ours)"),
    *_rows(
        (),
        COPY,
        "template dynamic_image_size use_thumbnail min_dynamic_patch max_dynamic_patch",
        "processing settings: no tensor fixes them",
    ),
    *_rows((), CARD, "license base_model", "the model card's front matter"),
    *_rows(
        (), OURS, "architectures auto_map torch_dtype dtype img_context_token_id", "written by the conversion"
    ),
    *_language_model_rows(("llm_config",)),
    *_rows(
        ("vision_config",),
        AGREE,
        "hidden_size intermediate_size num_hidden_layers num_attention_heads num_dummy_heads patch_size "
        "image_size num_channels layer_norm_eps norm_type qkv_bias qk_normalization hidden_act",
        "the checkpoint's tensors and args fix it",
    ),
)

QWEN2_FIELDS = (
    *_language_model_rows(()),
    *_rows((), AGREE, "model_type", "the model's function"),
    *_rows((), CARD, "license base_model", "the model card's front matter"),
)

# Flags transformers' GenerationConfig accepts only when do_sample is true.
SAMPLING_ONLY = ("temperature", "top_k", "top_p")


@dataclass
class Reference:
    """A reference config.json as read: its fields, the card's fields and where it came from."""

    file: Path
    config: dict
    sha256: str
    card: dict = field(default_factory=dict)  # license / base_model (config.json or README.md front matter)


def load_reference(path: Path) -> Reference:
    """Read a reference config.json, or the folder that holds one (and maybe a model card README.md)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = file.read_bytes()
        config = json.loads(data)
    except OSError as exc:
        raise ConversionError(f"{file}: cannot read the reference config ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConversionError(f"{file}: the reference config is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConversionError(
            f"{file}: the reference config holds a {type(config).__name__}, not a JSON object"
        )
    card = _front_matter(file.parent / "README.md")
    card.update({key: config[key] for key in ("license", "base_model") if isinstance(config.get(key), str)})
    return Reference(file=file, config=config, sha256=hashlib.sha256(data).hexdigest(), card=card)


def _front_matter(readme: Path) -> dict:
    """license and base_model of a Hub model card's YAML front matter (`key: value` or a `- item` list)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"---\r?\n(.*?)\r?\n---", text, re.S)
    if not match:
        return {}
    found, key = {}, None
    for line in match.group(1).splitlines():
        head = re.match(r"^([A-Za-z_]+):\s*(.*)$", line)
        if head:
            key, value = head.groups()
            if key in ("license", "base_model") and value:
                found[key] = value.strip().strip("'\"")
        elif key == "base_model" and "base_model" not in found and line.strip().startswith("- "):
            found[key] = line.strip()[2:].strip().strip("'\"")
    return found


def _lookup(config: dict, path: tuple[str, ...]):
    """(present, value) of a field. transformers 5 keeps rope_theta inside rope_parameters."""
    node = config
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return False, None
    last = path[-1]
    if last not in node and last == "rope_theta" and isinstance(node.get("rope_parameters"), dict):
        return "rope_theta" in node["rope_parameters"], node["rope_parameters"].get("rope_theta")
    return last in node, node.get(last)


def _assign(config: dict, path: tuple[str, ...], value) -> None:
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if path[-1] == "rope_scaling" and isinstance(node.get("rope_parameters"), dict):
        # transformers 5's form: back to rope_theta + rope_scaling, which the config class standardises.
        node["rope_theta"] = node.pop("rope_parameters").get("rope_theta")
    node[path[-1]] = copy.deepcopy(value)


def _same(ours, theirs) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return float(ours) == float(theirs)
    return ours == theirs


def apply_reference(family, config, reference: Reference, checkpoint: Path):
    """The checkpoint's config with the reference's COPY fields; ConversionError on the first AGREE
    field the two state differently (named with both values)."""
    ours = config.to_dict()
    for row in family.reference_fields:
        stated, theirs = _lookup(reference.config, row.path)
        if not stated:
            continue
        if row.rule == AGREE:
            present, mine = _lookup(ours, row.path)
            if present and not _same(mine, theirs):
                raise ConversionError(
                    f"{reference.file}: {'.'.join(row.path)} is {json.dumps(theirs)} there but "
                    f"{json.dumps(mine)} in the checkpoint {checkpoint} (the reference describes another "
                    "model); nothing written"
                )
        elif row.rule == COPY:
            _assign(ours, row.path, theirs)
    return family.config_class().from_dict(ours)


def generation_defaults(family, reference: Reference) -> dict:
    """The reference's generation defaults, as generation_config.json takes them."""
    found = {}
    for row in family.reference_fields:
        if row.rule == GENERATION:
            stated, value = _lookup(reference.config, row.path)
            if stated and value is not None:
                found[row.path[-1]] = value
    if not found.get("do_sample", False):
        for name in SAMPLING_ONLY:
            found.pop(name, None)
    return found


def write_generation_defaults(folder: Path, defaults: dict) -> None:
    """Merge `defaults` into the folder's generation_config.json (the reference's values win)."""
    if not defaults:
        return
    path = Path(folder) / "generation_config.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **defaults}, indent=2) + "\n")
