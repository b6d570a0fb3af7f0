"""Shared fixtures: the tiny tokenizer and model the project ships or builds, and the reference folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "tests" / "fixtures" / "tiny-tokenizer"
REFERENCE = REPO.parent / "shared" / "reference" / "nvlm-d-72b"


def reference_file(name: str) -> Path:
    """A file of the published release's metadata; skip the test where ../shared is absent."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the published NVLM-D-72B metadata lives in ../shared/reference")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_model():
    from modeling import NVLM_D_Model, get_config

    torch.manual_seed(0)
    return NVLM_D_Model(get_config("tiny")).eval()
