"""A converted folder on transformers 4.x (issue 16 item 1): vLLM pins transformers >=4.56,<5 and
loads the folder's remote code, so it must run there as on transformers 5.

The shipped trained checkpoint is converted by the real CLI; then two Pythons that cannot import
nvlm-port load the folder through the Auto classes with trust_remote_code: .venv's (transformers 5)
and the same interpreter with `.venv-tf4` (transformers 4.57, made by `make test`) first on its path.
Both must give the same float32 logits for a text and an image prompt, the same greedy answer
ending at <|im_end|> (the eos the folder records), with and without accelerate's disk offload, and
read the release's config.json alike.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import REFERENCE, REPO, TINY_TOKENIZER, cli, run_without_nvlm_port

TF4 = REPO / ".venv-tf4"
TRAINED = REPO / "tests" / "fixtures" / "nvlm-d-small-trained" / "megatron-tp2"
IMAGE = REPO / "tests" / "fixtures" / "synthetic-bench" / "images" / "ocr-0000.png"
QUESTION = "Read the text in the image."  # the trained model answers "4656" for this image
MAX_NEW_TOKENS = 24

_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys, tempfile
    sys.path[:] = [p for p in sys.path if p not in ("", ".", REPO)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in type(f).__module__]
    for name in ("modeling", "converter", "mappings"):
        assert importlib.util.find_spec(name) is None, name + " is importable"
    if TF4:
        sys.path.insert(0, TF4)
    import torch, transformers
    from PIL import Image
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoProcessor, AutoTokenizer)
    out = {"version": transformers.__version__}
    config = AutoConfig.from_pretrained(FOLDER, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True).eval()
    plain = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(FOLDER, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    out["classes"] = [type(x).__module__.split(".")[0] + ":" + type(x).__name__
                      for x in (config, model, plain, processor, processor.image_processor, image_processor)]
    out["dtype"] = str(model.dtype)

    image = Image.open(IMAGE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    text = processor(text=processor.apply_chat_template(
        [{"role": "user", "content": "Write a long sentence about red circles."}],
        add_generation_prompt=True, tokenize=False), return_tensors="pt")
    with torch.no_grad():
        out["image_logits"] = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits
        out["text_logits"] = model(input_ids=text["input_ids"]).logits
    out["inputs"] = dict(inputs)
    out["generated"] = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    out["eos"] = model.generation_config.eos_token_id
    out["chat"] = model.chat(tokenizer, inputs["pixel_values"], QUESTION, dict(max_new_tokens=MAX_NEW_TOKENS))

    device_map = {"vision_model.embeddings": "disk", "vision_model.encoder": "cpu", "mlp1": "disk",
                  "language_model.model.embed_tokens": "disk", "language_model.model.layers": "cpu",
                  "language_model.model.norm": "cpu", "language_model.model.rotary_emb": "cpu",
                  "language_model.lm_head": "disk"}
    offloaded = AutoModel.from_pretrained(FOLDER, trust_remote_code=True, device_map=device_map,
                                          offload_folder=tempfile.mkdtemp()).eval()
    assert offloaded.language_model.get_input_embeddings().weight.device.type == "meta"
    out["offloaded"] = offloaded.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)

    if RELEASE:  # the published config.json through the folder's configuration class
        published = json.load(open(RELEASE))
        release = type(config)(**published)
        saved = tempfile.mkdtemp()
        release.save_pretrained(saved)
        written = json.load(open(saved + "/config.json"))
        llm = release.llm_config
        out["release"] = {
            "published": published, "written": written, "llm_class": type(llm).__name__,
            "kv_heads": llm.num_key_value_heads, "padded_heads": release.vision_config.num_padded_heads,
            "num_image_token": release.num_image_token,
            "reloads": type(config).from_pretrained(saved).to_dict() == release.to_dict(),
        }
    torch.save(out, OUT)
    """
)


@pytest.fixture(scope="module")
def tf4():
    if not list(TF4.glob("transformers-4.*.dist-info")):
        pytest.skip(f"{TF4} with transformers 4.x is absent: `make test` (or `make venv-tf4`) creates it")
    return TF4


@pytest.fixture(scope="module")
def runs(tf4, tmp_path_factory):
    """{"4": ..., "5": ...}: what each transformers generation gives on one converted folder."""
    root = tmp_path_factory.mktemp("tf4")
    code, output = cli("megatron-to-hf", TRAINED, root / "hf", "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    release = REFERENCE / "config.json"
    made = {}
    for major, path in (("5", None), ("4", str(tf4))):
        out = root / f"transformers{major}.pt"
        constants = {"TF4": path, "OUT": str(out), "IMAGE": str(IMAGE), "QUESTION": QUESTION,
                     "MAX_NEW_TOKENS": MAX_NEW_TOKENS, "RELEASE": str(release) if release.exists() else None}
        head = "".join(f"{k} = {v!r}\n" for k, v in constants.items())
        workdir = root / f"work{major}"
        workdir.mkdir()
        run_without_nvlm_port(head + _SCRIPT, root / "hf", workdir)
        made[major] = torch.load(out)
    return made


def test_both_generations_load_the_folder_through_the_auto_classes(runs):
    assert runs["4"]["version"].startswith("4.") and runs["5"]["version"].startswith("5.")
    for major in ("4", "5"):
        config, model, plain, processor, inner, image_processor = runs[major]["classes"]
        for name in (config, model, plain, processor):
            assert name.startswith("transformers_modules:"), (major, name)  # the folder's own code
        assert (config, model, plain, processor) == (
            "transformers_modules:NVLM_D_Config",
            "transformers_modules:NVLM_D_Model",
            "transformers_modules:NVLM_D_Model",
            "transformers_modules:NVLMProcessor",
        )
        for name in (inner, image_processor):  # transformers' GotOcr2, in its PIL form
            assert name.split(":")[1] in ("GotOcr2ImageProcessor", "GotOcr2ImageProcessorPil"), (major, name)
        assert runs[major]["dtype"] == "torch.float32"


def test_same_inputs_and_logits_on_transformers_4_and_5(runs):
    four, five = runs["4"], runs["5"]
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(four["inputs"][key], five["inputs"][key]), key
    assert five["inputs"]["pixel_values"].shape[0] == 1  # the 64x64 image: one tile
    for key in ("text_logits", "image_logits"):
        assert five[key].dtype == torch.float32
        torch.testing.assert_close(four[key], five[key], rtol=0, atol=1e-5)
        assert torch.equal(four[key].argmax(-1), five[key].argmax(-1)), key


def test_generate_stops_at_eos_on_both(runs):
    for major in ("4", "5"):
        run = runs[major]
        tokens = run["generated"][0].tolist()
        assert run["eos"] == 980  # <|im_end|> of the tiny tokenizer, from generation_config.json
        assert tokens[-1] == run["eos"] and len(tokens) < MAX_NEW_TOKENS, (major, tokens)
        assert run["chat"] == "4656", (major, run["chat"])
        assert torch.equal(run["offloaded"], run["generated"]), major  # accelerate disk offload
    assert torch.equal(runs["4"]["generated"], runs["5"]["generated"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("llm_config", "vision_config"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("major", ["4", "5"])
def test_release_config_round_trip(runs, major):
    """The published config.json through the folder's configuration class: the same values, and a
    save that loses or changes no published field."""
    if "release" not in runs[major]:
        pytest.skip(f"{REFERENCE / 'config.json'} is absent: the release's metadata lives in ../shared")
    release = runs[major]["release"]
    assert release["llm_class"] == "Qwen2Config"  # built from the architecture, not model_type "llama"
    assert (release["kv_heads"], release["padded_heads"], release["num_image_token"]) == (8, 32, 256)
    assert release["reloads"]
    source, written = _flatten(release["published"]), _flatten(release["written"])
    bookkeeping = {"_commit_hash", "transformers_version"}
    kept = [k for k in source if k.split(".")[-1] not in bookkeeping]
    assert [k for k in kept if k not in written] == []
    assert {k: (source[k], written[k]) for k in kept if written[k] != source[k]} == {}
    assert written["architectures"] == ["NVLM_D"]
    assert written["llm_config.rope_scaling"] == {"factor": 3.0, "type": "dynamic"}
