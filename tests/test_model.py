"""NVLM_D_Model as a whole: the release's layout, its signatures, generation, and portability."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import reference_file, remote_code_logits
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM

from modeling import NVLM_D_Model, get_config
from modeling.processing_nvlm_d import image_to_pixel_values

GREEDY = dict(max_new_tokens=6, do_sample=False)


def test_72b_layout_matches_release():
    """The nvlm-d-72b preset on the meta device has exactly the release's 1556 names and shapes."""
    rows = reference_file("tensors.tsv").read_text().splitlines()[1:]
    expected = {}
    for row in rows:
        name, shape, _dtype, _shard = row.split("\t")
        expected[name] = tuple(int(s) for s in shape.split(","))
    assert len(expected) == 1556
    with torch.device("meta"):
        model = NVLM_D_Model(get_config("nvlm-d-72b"))
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [], "names missing from our class"
    assert sorted(set(ours) - set(expected)) == [], "names the release does not have"
    wrong = {n: (ours[n], expected[n]) for n in expected if ours[n] != expected[n]}
    assert not wrong
    index = json.loads(reference_file("model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    assert sum(t.numel() for t in model.state_dict().values()) == 79_379_593_344


def test_published_signatures_kept():
    forward = list(inspect.signature(NVLM_D_Model.forward).parameters)
    assert forward[:12] == [
        "self",
        "pixel_values",
        "input_ids",
        "attention_mask",
        "position_ids",
        "image_flags",
        "past_key_values",
        "labels",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    ]
    chat = list(inspect.signature(NVLM_D_Model.chat).parameters)
    assert chat == [
        "self",
        "tokenizer",
        "pixel_values",
        "question",
        "generation_config",
        "history",
        "return_history",
        "num_patches_list",
        "IMG_START_TOKEN",
        "IMG_END_TOKEN",
        "IMG_CONTEXT_TOKEN",
        "verbose",
        "visual_features",
    ]
    generate = list(inspect.signature(NVLM_D_Model.generate).parameters)
    assert generate[:8] == [
        "self",
        "pixel_values",
        "input_ids",
        "attention_mask",
        "visual_features",
        "generation_config",
        "output_hidden_states",
        "return_dict",
    ]


def test_auto_classes_build_our_model():
    config = get_config("tiny")
    assert isinstance(AutoModel.from_config(config), NVLM_D_Model)
    assert isinstance(AutoModelForCausalLM.from_config(config), NVLM_D_Model)


def _image_prompt(model, tokenizer, tiles: int):
    from modeling import build_prompt

    prompt = build_prompt("What is shown?", [tiles], model.num_image_token)
    return tokenizer(prompt, return_tensors="pt")


def test_forward_with_image_flags_and_labels(tiny_model, tiny_tokenizer):
    inputs = _image_prompt(tiny_model, tiny_tokenizer, 3)
    pixels = torch.randn(4, 3, 64, 64)
    flags = torch.tensor([[1], [1], [0], [1]])  # the release's padding tiles: flag 0 drops a tile
    with torch.no_grad():
        flagged = tiny_model(
            pixel_values=pixels, input_ids=inputs.input_ids, image_flags=flags, labels=inputs.input_ids
        )
        plain = tiny_model(pixel_values=pixels[[0, 1, 3]], input_ids=inputs.input_ids)
    torch.testing.assert_close(flagged.logits, plain.logits, rtol=0, atol=0)
    assert flagged.loss is not None and torch.isfinite(flagged.loss)
    as_tuple = tiny_model(pixel_values=pixels[[0, 1, 3]], input_ids=inputs.input_ids, return_dict=False)
    torch.testing.assert_close(as_tuple[0], plain.logits, rtol=0, atol=0)


def test_generate_continues_the_forward_argmax(tiny_model, tiny_tokenizer):
    """generate() runs on transformers 5 and its first token is the argmax of the forward logits."""
    inputs = _image_prompt(tiny_model, tiny_tokenizer, 2)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = tiny_model(pixel_values=pixels, input_ids=inputs.input_ids).logits
    out = tiny_model.generate(
        pixel_values=pixels,
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        max_new_tokens=4,
        do_sample=False,
    )
    assert out.shape == (1, 4) or (out.shape[0] == 1 and out.shape[1] <= 4)
    assert out[0, 0].item() == logits[0, -1].argmax().item()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_with_kv_cache_matches_greedy_without_cache(impl, tiny_tokenizer):
    """generate() (KV cache, image prompt) gives the tokens of a plain loop that reruns the whole
    forward on the prompt plus the tokens so far and takes the argmax of the last position."""
    torch.manual_seed(3)
    model = NVLM_D_Model(get_config("tiny")).eval()
    model.set_attn_implementation(impl)
    inputs = _image_prompt(model, tiny_tokenizer, 3)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    steps = 12
    cached = model.generate(
        pixel_values=pixels,
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,  # random weights: never stop early
        pad_token_id=tiny_tokenizer.pad_token_id,
    )[0].tolist()
    ids = inputs.input_ids
    uncached = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(pixel_values=pixels, input_ids=ids, use_cache=False).logits
            uncached.append(int(logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[uncached[-1]]])], dim=1)
    assert len(cached) == steps
    assert cached == uncached
    assert len(set(cached)) > 1  # not one token repeated: the continuation really depends on the cache


def test_generate_computes_last_position_logits_only(tiny_model, tiny_tokenizer):
    """At prefill generate() runs lm_head on the last prompt position only (not the whole prompt)."""
    inputs = _image_prompt(tiny_model, tiny_tokenizer, 2)
    rows = []
    hook = tiny_model.language_model.lm_head.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[1])
    )
    try:
        tiny_model.generate(
            pixel_values=torch.randn(2, 3, 64, 64),
            input_ids=inputs.input_ids,
            max_new_tokens=3,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    finally:
        hook.remove()
    assert inputs.input_ids.shape[1] > 32 and rows == [1, 1, 1]


def test_generate_takes_use_cache_and_generation_config(tiny_model, tiny_tokenizer):
    from transformers import GenerationConfig

    inputs = _image_prompt(tiny_model, tiny_tokenizer, 1)
    pixels = torch.randn(1, 3, 64, 64)
    kwargs = dict(pixel_values=pixels, input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    with_config = tiny_model.generate(**kwargs, generation_config=config)
    no_cache = tiny_model.generate(**kwargs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert with_config.tolist() == no_cache.tolist()


def test_chat_history_and_batch_chat(tiny_model, tiny_tokenizer):
    image = Image.new("RGB", (128, 64), (200, 30, 30))
    pixels = image_to_pixel_values(image, image_size=64, max_num=6)
    assert pixels.shape[0] == 3  # 2 tiles + thumbnail
    answer, history = tiny_model.chat(
        tiny_tokenizer, pixels, "What colour is this?", dict(GREEDY), return_history=True
    )
    assert isinstance(answer, str) and history == [("What colour is this?", answer)]
    follow_up = tiny_model.chat(tiny_tokenizer, None, "Are you sure?", dict(GREEDY), history=history)
    assert isinstance(follow_up, str)
    single = [
        tiny_model.chat(tiny_tokenizer, pixels, "What colour is this?", dict(GREEDY)),
        tiny_model.chat(tiny_tokenizer, pixels[:1], "And this one?", dict(GREEDY)),
        tiny_model.chat(tiny_tokenizer, None, "Say something.", dict(GREEDY)),
    ]
    batched = tiny_model.batch_chat(
        tiny_tokenizer,
        torch.cat([pixels, pixels[:1]]),
        ["What colour is this?", "And this one?", "Say something."],
        dict(GREEDY),
        num_patches_list=[3, 1, 0],
    )
    assert batched == single  # left padding changes nothing
    with pytest.raises(ValueError):  # one <image> marker, two images
        tiny_model.chat(tiny_tokenizer, pixels, "<image>\nCompare.", dict(GREEDY), num_patches_list=[2, 1])


def test_save_and_load_in_process(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    for name in (
        "configuration_nvlm_d.py",
        "modeling_nvlm_d.py",
        "modeling_intern_vit.py",
        "processing_nvlm_d.py",
        "config.json",
    ):
        assert (tmp_path / name).exists(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
        "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
        "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
    }
    loaded = NVLM_D_Model.from_pretrained(tmp_path).eval()
    inputs = _image_prompt(tiny_model, tiny_tokenizer, 1)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny_model(pixel_values=pixels, input_ids=inputs.input_ids).logits
        b = loaded(pixel_values=pixels, input_ids=inputs.input_ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_remote_code_loads_without_nvlm_port(tiny_model, tiny_tokenizer, tmp_path):
    folder = tmp_path / "hf"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    inputs = _image_prompt(tiny_model, tiny_tokenizer, 3)
    pixels = torch.randn(3, 3, 64, 64)
    remote = remote_code_logits(folder, pixels, inputs.input_ids, tmp_path)
    with torch.no_grad():
        ours = tiny_model(pixel_values=pixels, input_ids=inputs.input_ids).logits
    torch.testing.assert_close(remote, ours, rtol=0, atol=0)
