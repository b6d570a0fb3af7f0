"""A tokenizer folder given to the converter (or shipped in an HF folder): checked, measured."""

from __future__ import annotations

from pathlib import Path

from .errors import ConversionError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def tokenizer_info(folder: Path | None) -> tuple[int | None, int | None]:
    """Validate a tokenizer folder; return its <|vision_pad|> id (None without one) and its size."""
    if folder is None:
        return None, None
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: tokenizer folder does not exist")
    if not (folder / "tokenizer_config.json").exists() or not (
        (folder / "tokenizer.json").exists()
        or ((folder / "vocab.json").exists() and (folder / "merges.txt").exists())
    ):
        raise ConversionError(
            f"{folder}: not a tokenizer folder (needs tokenizer_config.json and tokenizer.json, "
            "or vocab.json + merges.txt)"
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ConversionError(
            f"{folder}: the tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from None
    pad = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    return (pad if isinstance(pad, int) and pad != tokenizer.unk_token_id else None), len(tokenizer)


def tokenizer_size(folder: Path) -> int | None:
    """Entries of the tokenizer shipped in an HF folder (Megatron's `vocab_size`), if there is one."""
    if not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False))
    except Exception:
        return None
