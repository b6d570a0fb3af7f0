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
