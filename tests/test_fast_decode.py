"""The decode path and the ViT's real-head computation (issue 17): same tokens, same tensors.

GreedyDecoder (static KV cache; one CUDA graph replay per token on a GPU) runs here on the CPU, eagerly,
with `fast_decode=True`: its tokens must be those of transformers' own greedy loop and of a plain loop
that reruns the whole uncached forward. The CUDA graph itself replays the same step (the GPU run of
scripts/bench_model.py checks its tokens in fp32 against the same reference)."""

from __future__ import annotations

import pytest
import torch

from modeling import NVLM_D_Model, build_prompt, get_config
from modeling.modeling_nvlm_d import GreedyDecoder, greedy_plan


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return NVLM_D_Model(get_config("tiny")).eval()


def image_prompt(model, tokenizer, tiles: int, question: str = "What is shown?"):
    prompt = build_prompt(question, [tiles], model.num_image_token)
    return tokenizer(prompt, return_tensors="pt")


def generate(model, inputs, pixels, fast, **kwargs):
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0) | kwargs
    return model.generate(
        pixel_values=pixels,
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        fast_decode=fast,
        **kwargs,
    )


def test_greedy_decoder_gives_the_tokens_of_transformers_and_of_the_uncached_loop(model, tiny_tokenizer):
    inputs = image_prompt(model, tiny_tokenizer, 2)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model._decoder = None
    fast = generate(model, inputs, pixels, True)[0].tolist()
    assert isinstance(model._decoder, GreedyDecoder) and model._decoder.graph is None  # CPU: eager
    plain = generate(model, inputs, pixels, False)[0].tolist()
    ids, uncached = inputs.input_ids, []
    with torch.no_grad():
        for _ in range(10):
            logits = model(pixel_values=pixels, input_ids=ids, use_cache=False).logits
            uncached.append(int(logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[uncached[-1]]])], dim=1)
    assert fast == plain == uncached
    assert len(set(fast)) > 1
    one = generate(model, inputs, pixels, True, max_new_tokens=1)[0].tolist()
    assert one == fast[:1]


def test_the_decoder_is_kept_for_prompts_of_similar_length(model, tiny_tokenizer):
    pixels = torch.randn(1, 3, 64, 64)
    model._decoder = None
    generate(model, image_prompt(model, tiny_tokenizer, 1), pixels, True)
    first = model._decoder
    longer = image_prompt(model, tiny_tokenizer, 1, "What is shown here, in a few more words?")
    again = generate(model, longer, pixels, True)
    assert model._decoder is first  # same batch size, same 256-position cache
    assert again[0].tolist() == generate(model, longer, pixels, False)[0].tolist()


def test_eos_and_a_batch_end_as_in_transformers(model, tiny_tokenizer):
    """Rows that finish early are padded and the output ends where the last row finished."""
    prompt = build_prompt("Describe it.", [1], model.num_image_token)
    inputs = tiny_tokenizer([prompt, prompt], return_tensors="pt")  # two images, one tile each
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    free = generate(model, inputs, pixels, False, max_new_tokens=12)
    assert free.shape == (2, 12) and free[0].tolist() != free[1].tolist()
    for eos in {int(free[0, 3]), int(free[1, 6]), int(free[0, 11])}:
        kwargs = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=7)
        expected = generate(model, inputs, pixels, False, **kwargs)
        got = generate(model, inputs, pixels, True, **kwargs)
        assert got.tolist() == expected.tolist()


def test_requests_the_decoder_does_not_cover_go_to_transformers(model, tiny_tokenizer):
    lm = model.language_model
    assert greedy_plan(lm, None, dict(max_new_tokens=4)) is not None
    assert greedy_plan(lm, None, dict(max_new_tokens=4, do_sample=True)) is None
    assert greedy_plan(lm, None, dict(max_new_tokens=4, num_beams=2)) is None
    assert greedy_plan(lm, None, dict(max_new_tokens=4, repetition_penalty=1.3)) is None
    assert greedy_plan(lm, None, dict(max_new_tokens=4, use_cache=False)) is None
    assert greedy_plan(lm, None, dict()) is None  # max_length semantics: transformers'
    assert greedy_plan(lm, torch.tensor([[0, 1, 1]]), dict(max_new_tokens=4)) is None  # padded
    previous = lm.generation_config.no_repeat_ngram_size
    lm.generation_config.no_repeat_ngram_size = 2
    try:
        assert greedy_plan(lm, None, dict(max_new_tokens=4)) is None
    finally:
        lm.generation_config.no_repeat_ngram_size = previous
    inputs = image_prompt(model, tiny_tokenizer, 1)
    pixels = torch.randn(1, 3, 64, 64)
    model._decoder = None
    generate(model, inputs, pixels, None)  # the CPU: transformers' loop unless asked
    assert model._decoder is None
    generate(model, inputs, pixels, True, repetition_penalty=1.3)
    assert model._decoder is None
    model.fast_decode = False
    try:
        generate(model, inputs, pixels, True)  # fast_decode=True asks: the argument wins
        assert model._decoder is not None
    finally:
        model.fast_decode = True
    model._decoder = None
    generate(model, inputs, pixels, False)
    assert model._decoder is None


def set_dummy_heads(attn, value: float) -> None:
    real, padded = attn.embed_dim, attn.padded_dim
    with torch.no_grad():
        attn.qkv.weight.view(3, padded, -1)[:, real:] = value
        attn.proj.weight[:, real:] = value


def test_vit_computes_on_the_real_heads_with_the_same_result(model):
    vit = model.vision_model
    attn = vit.encoder.layers[0].attn
    config = model.config.vision_config
    assert attn.num_heads == config.num_padded_heads > config.num_attention_heads
    assert [layer.attn.computed_heads() for layer in vit.encoder.layers] == [
        config.num_attention_heads
    ] * len(vit.encoder.layers)
    x = torch.randn(2, 17, config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        real = attn(x)
        attn.computed_heads = lambda: attn.num_heads  # all 32, as the release computes them
        try:
            padded = attn(x)
        finally:
            del attn.computed_heads
    torch.testing.assert_close(real, padded, rtol=1e-5, atol=1e-6)


def test_dummy_heads_that_contribute_are_computed(model):
    """A checkpoint whose dummy heads are not zero (V rows and projection columns) keeps all heads,
    noticed after an in-place edit of the weights (the check follows the tensors' versions)."""
    torch.manual_seed(9)
    other = NVLM_D_Model(get_config("tiny")).eval()
    attn = other.vision_model.encoder.layers[0].attn
    assert attn.computed_heads() == attn.config.num_attention_heads
    set_dummy_heads(attn, 0.01)
    assert attn.computed_heads() == attn.num_heads
    x = torch.randn(1, 17, attn.embed_dim)
    with torch.no_grad():
        out = attn(x)
        attn.computed_heads = lambda: attn.config.num_attention_heads
        try:
            assert not torch.allclose(out, attn(x))  # dropping them would change the result
        finally:
            del attn.computed_heads
        attn.proj.weight[:, attn.embed_dim :] = 0  # zero projection columns alone suffice
    assert attn.computed_heads() == attn.config.num_attention_heads


def test_release_layout_kept_bit_exact_through_save_and_load(model, tmp_path):
    before = {name: t.clone() for name, t in model.state_dict().items()}
    attn = model.vision_model.encoder.layers[0].attn
    assert before["vision_model.encoder.layers.0.attn.qkv.weight"].shape[0] == 3 * attn.padded_dim
    assert before["vision_model.encoder.layers.0.attn.proj.weight"].shape[1] == attn.padded_dim
    model.save_pretrained(tmp_path)
    loaded = NVLM_D_Model.from_pretrained(tmp_path).eval()
    after = loaded.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    layer = loaded.vision_model.encoder.layers[0].attn
    assert layer.computed_heads() == layer.config.num_attention_heads


TF4_CHECK = """
import sys
sys.path[:0] = [TF4, REPO]
import torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
from modeling import NVLM_D_Model, get_config
torch.manual_seed(0)
model = NVLM_D_Model(get_config("tiny")).eval()
ids = torch.randint(0, 900, (1, 40))
ids[0, 5:21] = model.config.img_context_token_id
kwargs = dict(pixel_values=torch.randn(1, 3, 64, 64), input_ids=ids, max_new_tokens=12, do_sample=False,
              eos_token_id=None, pad_token_id=0)
plain = model.generate(**kwargs, fast_decode=False)
fast = model.generate(**kwargs, fast_decode=True)
assert model._decoder is not None and plain.tolist() == fast.tolist(), (plain, fast)
kwargs["eos_token_id"] = int(fast[0, 4])
stopped = model.generate(**kwargs, fast_decode=True)
assert stopped.tolist() == model.generate(**kwargs, fast_decode=False).tolist() and stopped.shape[1] <= 5
"""


def test_greedy_decoder_on_transformers_4(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    tf4 = REPO / ".venv-tf4"
    if not list(tf4.glob("transformers-4.*.dist-info")):
        pytest.skip(f"{tf4} with transformers 4.x is absent: `make test` (or `make venv-tf4`) creates it")
    source = f"TF4 = {str(tf4)!r}\nREPO = {str(REPO)!r}\n" + TF4_CHECK
    run = subprocess.run(
        [sys.executable, "-I", "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_patched_attention_computes_all_heads_through_its_modules(model):
    """The parity tools replace `_qk_norm` or a submodule's forward to change rounding order: the
    attention then takes the release's path through those calls, all 32 heads."""
    attn = model.vision_model.encoder.layers[1].attn
    calls = []
    attn.proj.forward = lambda x: calls.append(x.shape[-1]) or torch.nn.Linear.forward(attn.proj, x)
    try:
        assert attn.computed_heads() == attn.num_heads
        with torch.no_grad():
            attn(torch.randn(1, 5, attn.embed_dim))
    finally:
        del attn.proj.forward
    assert calls == [attn.padded_dim]
    assert attn.computed_heads() == attn.config.num_attention_heads
