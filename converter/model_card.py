"""The model card (`README.md`) a conversion writes into its Hugging Face folder.

The Hub's convention: YAML front matter (license, `library_name`, `pipeline_tag`, tags, base model)
then prose. Ours records provenance, what `nvlm_port_manifest.json` also holds in machine form: the
source checkpoint (path, format, iteration, TP/PP), the dtype policy, the tool and its version, and
the sha256 of every weight shard. No timestamp, so a resumed conversion writes the same bytes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD = "README.md"


_PLAIN = re.compile(r"^[\w./-]+$")


def _front_matter(fields: dict) -> str:
    """YAML front matter; a value that is not a plain token is written as a JSON string (valid YAML)."""
    lines = ["---"]
    for key, value in fields.items():
        values = value if isinstance(value, list) else [value]
        text = [v if _PLAIN.match(v) else json.dumps(v) for v in values if v is not None]
        if not text:
            continue
        lines += [f"{key}:", *(f"- {v}" for v in text)] if isinstance(value, list) else [f"{key}: {text[0]}"]
    lines.append("---")
    return "\n".join(lines)


def card_text(
    *,
    family,
    source: dict,
    tool: dict,
    shards: dict[str, str],
    license: str | None = None,
    base_model: str | None = None,
    reference_sha256: str | None = None,
) -> str:
    """The card of a converted folder. `shards` maps each weight file to its sha256."""
    front = _front_matter(
        {
            "license": license or "other",
            "library_name": "transformers",
            "pipeline_tag": family.pipeline_tag,
            "tags": [*family.card_tags, "nvlm-port", "megatron-lm"],
            "base_model": base_model,
        }
    )
    remote = ", trust_remote_code=True" if "custom_code" in family.card_tags else ""
    rows = [
        ("source checkpoint", f"`{source['path']}`"),
        ("format", f"Megatron-LM `{source['format']}`, {source['iteration']}"),
        ("parallel layout", f"TP={source['tensor_parallel']} PP={source['pipeline_parallel']}"),
        ("dtype policy", f"`--dtype {source['dtype']}`"),
        ("converted by", f"{tool['name']} {tool['version']} (`convert-checkpoint megatron-to-hf`)"),
        (
            "release fields",
            f"from a `--reference-config` (sha256 `{reference_sha256}`), sizes checked against the checkpoint"
            if reference_sha256
            else "none invented: `--reference-config RELEASE/config.json` copies rope_scaling, processing "
            "and generation defaults, license and base model",
        ),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    files = "\n".join(f"| `{file}` | `{digest}` |" for file, digest in sorted(shards.items()))
    return f"""{front}

# {family.card_title}

Converted from a Megatron-LM checkpoint. Every tensor was copied exactly (renamed, re-split,
padding dropped; no arithmetic on values).

| | |
|---|---|
{table}

## Loading

```python
from transformers import {family.auto_class}, AutoTokenizer

model = {family.auto_class}.from_pretrained("path/to/this/folder"{remote})
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{remote})
```

## Integrity

Every file's sha256 and size are in `nvlm_port_manifest.json`; `convert-checkpoint verify FOLDER`
checks them, and `--against SOURCE` compares every tensor with the Megatron checkpoint, bitwise.

| weight file | sha256 |
|---|---|
{files}
"""


def write_card(folder: Path, *, family, source: dict, tool: dict, digests: dict, **fields) -> None:
    """README.md into `folder`. Nothing in it depends on where the folder is written, so the bytes
    are the same for any DST (and with --workers)."""
    shards = {file: digest.sha256 for file, digest in digests.items() if file.endswith(".safetensors")}
    text = card_text(family=family, source=source, tool=tool, shards=shards, **fields)
    (Path(folder) / CARD).write_text(text)


# -- parity figures (`parity-check ... --card FOLDER`) ---------------------------------------------

PARITY_BEGIN = "<!-- parity-check: begin (written by parity-check --card; a run replaces its own entry) -->"
PARITY_END = "<!-- parity-check: end -->"
_ENTRY = re.compile(
    r"<!-- parity-check run: (?P<key>.+?) -->\n(?P<body>.*?)<!-- parity-check run end -->\n", re.S
)


def with_parity_entry(card: str, key: str, body: str) -> str:
    """The card with a `## Parity` section holding one entry per `key` (command, dtype, layout):
    the entry of `key` replaced, the others kept, in key order; the section is added at the end the
    first time and stays where it is after that."""
    head, section, tail = card, "", ""
    if PARITY_BEGIN in card and PARITY_END in card.split(PARITY_BEGIN, 1)[1]:
        head, rest = card.split(PARITY_BEGIN, 1)
        section, tail = rest.split(PARITY_END, 1)
    entries = {m["key"]: m["body"] for m in _ENTRY.finditer(section)}
    entries[key] = body.rstrip("\n") + "\n"
    blocks = "".join(
        f"<!-- parity-check run: {k} -->\n{entries[k]}<!-- parity-check run end -->\n"
        for k in sorted(entries)
    )
    intro = (
        "## Parity\n\nMegatron-Core and this folder on identical inputs (`parity-check`, "
        "nvlm-port's parity suite); the figures of the last run of each kind.\n\n"
    )
    return f"{head.rstrip()}\n\n{PARITY_BEGIN}\n{intro}{blocks}{PARITY_END}\n{tail.lstrip(chr(10))}"


def add_parity_entry(folder: Path, key: str, body: str) -> Path:
    """Write the entry into FOLDER/README.md and re-seal the card's line of the folder's manifest
    (converter/manifest.py), so `convert-checkpoint verify FOLDER` still passes. Refused (one line)
    when there is no card, or when the card differs from what the manifest recorded: a change made
    by someone else is not sealed over."""
    from .errors import ConversionError
    from .formats.checksums import digest_of
    from .manifest import MANIFEST, read_manifest, reseal

    folder = Path(folder)
    path = folder / CARD
    if not path.is_file():
        raise ConversionError(f"{path}: no model card (convert-checkpoint megatron-to-hf writes one)")
    try:
        manifest = read_manifest(folder)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    listed = (manifest or {}).get("files", {}).get(CARD)
    if listed is not None and digest_of(path).sha256 != listed["sha256"]:
        raise ConversionError(
            f"{path}: changed since {MANIFEST} recorded it; --card re-seals only a card it can vouch for"
        )
    partial = path.with_name(CARD + ".partial")
    partial.write_text(with_parity_entry(path.read_text(), key, body))
    partial.replace(path)
    if listed is not None:
        reseal(folder, CARD, by="parity-check --card")
    return path
