"""A tokenizer folder given to the converter (or shipped in an HF folder): checked, measured."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class TokenizerInfo:
    """What a conversion takes from the tokenizer: its size (the true vocab), the id of the family's
    image placeholder (None without one) and the special ids the configs record (None where absent)."""

    size: int | None = None
    image_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None


def tokenizer_info(folder: Path | None, image_token: str | None = None) -> TokenizerInfo:
    """Validate a tokenizer folder and read what a conversion needs of it (all None without one);
    `image_token`: the family's image placeholder (families/base.py `image_token`; None: none)."""
    if folder is None:
        return TokenizerInfo()
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

    def known(token: str) -> int | None:
        found = tokenizer.convert_tokens_to_ids(token)
        return found if isinstance(found, int) and found != tokenizer.unk_token_id else None

    # Qwen2 tokenizers have no bos token; the release records <|endoftext|> as bos, as Qwen2 does
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else known("<|endoftext|>")
    return TokenizerInfo(
        size=len(tokenizer),
        image_token_id=known(image_token) if image_token is not None else None,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=bos,
        pad_token_id=tokenizer.pad_token_id,
    )


def tokenizer_size(folder: Path) -> int | None:
    """Entries of the tokenizer shipped in an HF folder (Megatron's `vocab_size`), if there is one."""
    if not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False))
    except Exception:
        return None
