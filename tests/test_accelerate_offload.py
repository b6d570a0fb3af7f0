"""chat() / generate() / forward with accelerate offloading (issue 16 item 6).

With `device_map` putting modules on "disk" (or "cpu" beside a GPU), their weights stay on the meta
device and accelerate's hooks bring them in at each call: inputs must go where a module computes
(its hook's execution device), not to its weight's device ("Cannot copy out of meta tensor"). CPU
only: disk offload of the shipped trained model, converted by the real CLI; greedy tokens, chat
answers and logits equal those of the model loaded whole.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, TINY_TOKENIZER, cli

pytest.importorskip("accelerate", reason="offloading needs accelerate: pip install 'nvlm-port[accelerate]'")

from modeling import NVLM_D_Model  # noqa: E402
from modeling.processing_nvlm_d import image_to_pixel_values  # noqa: E402

TRAINED = REPO / "tests" / "fixtures" / "nvlm-d-small-trained" / "megatron-tp2"
BENCH_IMAGES = REPO / "tests" / "fixtures" / "synthetic-bench" / "images"
IMAGES = ("ocr-0000.png", "chart-0000.png")  # 64x64: one tile each

# Every module whose weight the inputs used to follow is on disk; the others on the CPU.
EXPLICIT = {
    "vision_model.embeddings": "disk",
    "vision_model.encoder": "cpu",
    "mlp1": "disk",
    "language_model.model.embed_tokens": "disk",
    "language_model.model.layers": "cpu",
    "language_model.model.norm": "cpu",
    "language_model.model.rotary_emb": "cpu",
    "language_model.lm_head": "disk",
}
# accelerate's own placement under a memory cap: the whole language model goes to disk, hooked at
# `language_model` (an ancestor of the embedding), part of the ViT stays on the CPU.
AUTO = {"device_map": "auto", "max_memory": {"cpu": "4MB"}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    code, output = cli("megatron-to-hf", TRAINED, root / "hf", "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    return root / "hf"


@pytest.fixture(scope="module")
def whole(folder):
    return NVLM_D_Model.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("placement", [{"device_map": EXPLICIT}, AUTO], ids=["explicit", "auto"])
def test_offloaded_model_answers_as_the_whole_one(folder, whole, tokenizer, placement, tmp_path):
    model = NVLM_D_Model.from_pretrained(folder, offload_folder=str(tmp_path), **placement).eval()
    assert "disk" in set(model.hf_device_map.values())
    assert model.language_model.get_input_embeddings().weight.device.type == "meta"

    images = [image_to_pixel_values(BENCH_IMAGES / name, image_size=64) for name in IMAGES]
    questions = ["Read the text in the image.", "What is the value of bar B?"]
    greedy = dict(max_new_tokens=8, do_sample=False)
    answer = model.chat(tokenizer, images[0], questions[0], greedy)
    assert answer == whole.chat(tokenizer, images[0], questions[0], greedy) == "4656"  # as bench.jsonl

    pixels, counts = torch.cat(images), [len(images[0]), len(images[1])]
    batched = [
        m.batch_chat(tokenizer, pixels, questions, greedy, num_patches_list=counts)
        for m in (model, whole)
    ]
    assert batched[0] == batched[1] == ["4656", "20"]

    ids = tokenizer(questions[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
        assert torch.equal(model.generate(input_ids=ids, **greedy), whole.generate(input_ids=ids, **greedy))
