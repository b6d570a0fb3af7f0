"""The LLaVA family: Megatron-LM examples/multimodal's default LLaVA <-> transformers' own
LlavaForConditionalGeneration (the oracle: an HF class this project did not write).

A random tiny LlavaForConditionalGeneration (CLIP ViT with a class token, MHA with biases; Mistral
text: 4 query heads over 2 KV groups, no QKV bias, SwiGLU, untied; a 250-row vocabulary that
Megatron pads to 256 at TP=2) goes through the real CLI: HF -> Megatron at TP=2 (legacy and
torch_dist) and back, bit for bit; `verify --against` passes; megatron-core's own LLaVAModel with
CLIPViTModel, at TP=2 over 2 gloo ranks, computes the transformers logits on a text and an image
prompt. A variant keeps the class token ("full") and gives the projector biases.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, load_hf_tensors

VIT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=42,
    patch_size=14,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,
    max_position_embeddings=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,  # not the ViT's 1e-5: each must travel on its own
    sliding_window=None,
    tie_word_embeddings=False,
)
IMAGE_TOKEN, PATCHES, PADDED_VOCAB = 249, 9, 256
VIT_HEAD_DIM = VIT["hidden_size"] // VIT["num_attention_heads"]
# The recipe (pretrain_mistral_clip.sh): class token dropped, projector without biases. The variant
# keeps the class token and has biases.
RECIPE = dict(vision_feature_select_strategy="default", multimodal_projector_bias=False)
VARIANT = dict(
    vision_feature_select_strategy="full", multimodal_projector_bias=True, image_seq_length=PATCHES + 1
)
# Measured max |Megatron - transformers|, both prompts, all three checkpoints: 8.3e-7 (largest logit 1.7).
LOGITS_ATOL = 1e-5


def llava_config(**overrides):
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

    settings = dict(
        vision_config=CLIPVisionConfig(**VIT, hidden_act="quick_gelu"),
        text_config=MistralConfig(**TEXT),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=PATCHES,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **RECIPE,
    )
    return LlavaConfig(**{**settings, **overrides})


def save_llava(folder: Path, **overrides):
    """A random LlavaForConditionalGeneration saved with save_pretrained. Every tensor is random
    (biases and norms included) except CLIP's post_layernorm, which LLaVA never reads and Megatron
    does not have: it keeps transformers' identity initialisation."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "post_layernorm" in name:
                continue
            noise = torch.randn_like(param)
            norm = "norm" in name and name.endswith("weight")
            param.copy_(1 + 0.1 * noise if norm else 0.05 * noise)
    model.save_pretrained(folder)
    return model


def prompts(strategy: str):
    """(HF ids, Megatron ids, pixels): a text prompt and one with an image after 3 tokens. Megatron
    marks the image with ONE image token; transformers with one per image embedding."""
    generator = torch.Generator().manual_seed(3)
    text = torch.randint(0, IMAGE_TOKEN, (1, 12), generator=generator)
    per_image = PATCHES + (strategy == "full")
    before, after = text[:, :3], text[:, 3:9]
    hf_image = torch.cat([before, torch.full((1, per_image), IMAGE_TOKEN), after], dim=1)
    megatron_image = torch.cat([before, torch.tensor([[IMAGE_TOKEN]]), after], dim=1)
    pixels = torch.randn(1, 3, VIT["image_size"], VIT["image_size"], generator=generator)
    return [(text, text, None), (hf_image, megatron_image, pixels)]


def _load_rank(path: Path) -> dict:
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)


def _rank_file(root: Path, tp_rank: int) -> Path:
    return root / "iter_0000001" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """HF folders (recipe, variant) and `hf-to-megatron --tp 2` of them by the real CLI: recipe as
    legacy and torch_dist, variant as legacy; plus each HF model's reference logits."""
    root = tmp_path_factory.mktemp("llava")
    made = {}
    for key, overrides, fmt in (
        ("legacy", RECIPE, "torch"),
        ("dist", RECIPE, "torch_dist"),
        ("variant", VARIANT, "torch"),
    ):
        hf = root / f"hf-{key}"
        if key == "dist":
            hf, model = made["legacy"]["hf"], made["legacy"]["model"]
        else:
            model = save_llava(hf, **overrides)
        out = root / f"meg-{key}"
        code, output = cli("hf-to-megatron", hf, out, "--tp", "2", "--format", fmt)
        assert code == 0, output
        with torch.no_grad():
            reference = [
                model(input_ids=ids, pixel_values=pixels).logits
                for ids, _, pixels in prompts(overrides["vision_feature_select_strategy"])
            ]
        made[key] = dict(hf=hf, megatron=out, model=model, reference=reference, overrides=overrides)
    return made


def test_rank_files_hold_llava_names_and_the_recipes_args(converted):
    root = converted["legacy"]["megatron"]
    state = _load_rank(_rank_file(root, 1))
    model, args = state["model"], state["args"]
    assert args.vision_model_type == "clip" and args.disable_vision_class_token
    assert (args.img_h, args.patch_dim, args.image_token_index) == (42, 14, IMAGE_TOKEN)
    assert not args.add_qkv_bias and args.swiglu and args.padded_vocab_size == PADDED_VOCAB
    assert {n.split(".")[0] for n in model} == {"language_model", "vision_model", "vision_projection"}
    assert tuple(model["vision_model.class_token"].shape) == (1, 1, VIT["hidden_size"])
    assert tuple(model["vision_model.position_embeddings.weight"].shape) == (PATCHES + 1, VIT["hidden_size"])
    assert "vision_model.ln_pre.bias" in model and not any("ln_post" in n for n in model)
    assert tuple(model["vision_model.decoder.layers.1.self_attention.linear_qkv.bias"].shape) == (
        3 * 32 // 2,
    )
    assert tuple(model["vision_projection.encoder.linear_fc1.weight"].shape) == (64 // 2, VIT["hidden_size"])
    assert "vision_projection.encoder.linear_fc1.bias" not in model  # the recipe's projector has none
    assert tuple(model["language_model.output_layer.weight"].shape) == (PADDED_VOCAB // 2, 64)
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.bias" not in model


def test_vit_qkv_layout_is_megatrons(converted):
    """Built from the HF tensors without mappings/transforms.py: CLIP's fused QKV interleaves per
    head [q_h; k_h; v_h] (clip_converter.py's indices), two heads per TP rank, biases alike."""
    hf = load_hf_tensors(converted["legacy"]["hf"])
    prefix = "vision_tower.encoder.layers.0.self_attn."
    for tp_rank in range(2):
        model = _load_rank(_rank_file(converted["legacy"]["megatron"], tp_rank))["model"]
        for part in ("weight", "bias"):
            q, k, v = (hf[f"{prefix}{p}_proj.{part}"].split(VIT_HEAD_DIM) for p in "qkv")
            heads = range(2 * tp_rank, 2 * tp_rank + 2)
            expected = torch.cat([torch.cat([q[h], k[h], v[h]]) for h in heads])
            assert torch.equal(
                model[f"vision_model.decoder.layers.0.self_attention.linear_qkv.{part}"], expected
            )


@pytest.mark.parametrize("key", ["legacy", "dist", "variant"])
def test_back_to_hf_is_bit_exact_and_loads_in_transformers(converted, key, tmp_path):
    from transformers import LlavaForConditionalGeneration

    case = converted[key]
    out = tmp_path / "hf"
    code, output = cli("megatron-to-hf", case["megatron"], out, "--no-tokenizer")
    assert code == 0, output
    assert ", llava: " in output
    original, back = load_hf_tensors(case["hf"]), load_hf_tensors(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    config, source = (json.loads((f / "config.json").read_text()) for f in (out, case["hf"]))
    for field in (
        "architectures",
        "image_token_index",
        "image_seq_length",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "multimodal_projector_bias",
        "projector_hidden_act",
    ):
        assert config[field] == source[field], field
    for sub, fields in (("vision_config", [*VIT, "hidden_act", "layer_norm_eps"]), ("text_config", TEXT)):
        for field in fields:
            field = "rope_parameters" if field == "rope_theta" else field
            assert config[sub][field] == source[sub][field], (sub, field)
    code, output = cli("verify", out, "--against", case["megatron"])
    assert code == 0, output
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        for (ids, _, pixels), reference in zip(
            prompts(config["vision_feature_select_strategy"]), case["reference"]
        ):
            assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, reference)


@pytest.fixture(scope="module")
def megatron_logits(converted):
    """megatron-core's LLaVAModel (CLIPViTModel, subtype clip) at TP=2 on 2 gloo ranks, loading
    each checkpoint the CLI wrote, configured from the checkpoint (the family's hf_config of its
    args and tensors)."""
    pytest.importorskip("megatron.core", reason="megatron-core is needed for the Megatron side")
    from converter.engine import open_megatron
    from converter.families import LLaVA
    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks
    from modeling.megatron.llava import llava_logits

    runs, keys = [], ["legacy", "dist", "variant"]
    for key in keys:
        ckpt = open_megatron(converted[key]["megatron"])
        config = LLaVA.hf_config(ckpt.args, ckpt=ckpt)
        runs.append((config.to_dict(), str(converted[key]["megatron"]), ckpt.args.padded_vocab_size))
    by_strategy = {s: [(m, p) for _, m, p in prompts(s)] for s in ("default", "full")}
    # one spawn for all: the variant's prompts differ only in the image's token count, which
    # Megatron derives itself from its single image token
    results = run_ranks(llava_logits, ParallelLayout(2, 1), runs, by_strategy["default"])
    return dict(zip(keys, results))


@pytest.mark.parametrize("key", ["legacy", "dist", "variant"])
def test_megatron_llava_matches_transformers(megatron_logits, converted, key):
    """Text and image prompt: LLaVAModel.forward (one image token, expanded by the model) against
    LlavaForConditionalGeneration (one token per image embedding), fp32."""
    logits = megatron_logits[key]
    assert isinstance(logits, list), logits  # else: the error text of the load
    for mine, reference in zip(logits, converted[key]["reference"]):
        assert mine.shape == reference.shape
        assert torch.equal(mine.argmax(-1), reference.argmax(-1))
        torch.testing.assert_close(mine, reference, rtol=0, atol=LOGITS_ATOL)


# -- traps ---------------------------------------------------------------------------------------


def test_a_trained_post_layernorm_is_refused(tmp_path):
    """HF's post_layernorm has no place in Megatron's CLIPViTModel: a non-identity one is refused."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(llava_config())
    with torch.no_grad():
        model.model.vision_tower.post_layernorm.weight.fill_(2.0)
    model.save_pretrained(tmp_path / "hf")
    code, output = cli("hf-to-megatron", tmp_path / "hf", tmp_path / "meg")
    assert code == 2 and "not 1.0 everywhere" in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "meg").exists()


def test_the_penultimate_feature_layer_is_refused(tmp_path):
    """LLaVA-1.5's vision_feature_layer -2: Megatron's ViT feeds its last layer to the projector."""
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration(llava_config(vision_feature_layer=-2)).save_pretrained(tmp_path / "hf")
    code, output = cli("hf-to-megatron", tmp_path / "hf", tmp_path / "meg")
    assert code == 2 and "vision_feature_layer is -2" in output, output


def test_a_projector_wider_than_the_llm_is_refused(converted, tmp_path):
    """The recipe's mistral_7b projector is 14336 wide; transformers' is the LLM's hidden size."""
    copy = tmp_path / "wide"
    shutil.copytree(converted["legacy"]["megatron"], copy)
    for tp_rank in range(2):
        path = _rank_file(copy, tp_rank)
        state = _load_rank(path)
        model = state["model"]
        model["vision_projection.encoder.linear_fc1.weight"] = torch.zeros(64, VIT["hidden_size"])
        model["vision_projection.encoder.linear_fc2.weight"] = torch.zeros(64, 64)
        torch.save(state, path)
    code, output = cli("megatron-to-hf", copy, "--dry-run")
    assert code == 2 and "the projector maps 32 -> 128 -> 64" in output, output


def test_the_image_token_comes_from_the_tokenizer(converted, tmp_path):
    """Megatron-LM's args hold no image token id: without our writer's `image_token_index`, the
    tokenizer's <image> gives it, and without a tokenizer the conversion is refused."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    copy = tmp_path / "no-id"
    shutil.copytree(converted["legacy"]["megatron"], copy)
    for tp_rank in range(2):
        path = _rank_file(copy, tp_rank)
        state = _load_rank(path)
        del state["args"].image_token_index
        torch.save(state, path)
    code, output = cli("megatron-to-hf", copy, "--dry-run")
    assert code == 2 and "the <image> token id is unknown" in output, output
    vocab = {f"w{i}": i for i in range(TEXT["vocab_size"] - 2)} | {"<unk>": 248, "<image>": 249}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    )
    tokenizer.unk_token = "<unk>"
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    code, output = cli("megatron-to-hf", copy, tmp_path / "hf", "--tokenizer", tmp_path / "tokenizer")
    assert code == 0, output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_token_index"] == 249


def test_class_token_and_unused_twin_transforms_are_exact():
    from mappings.transforms import ClassToken, LayoutError, WithUnused

    token = torch.randn(1, 1, 8)
    (hf,) = ClassToken().to_hf(token)
    assert hf.shape == (8,) and torch.equal(ClassToken().from_hf([hf], 2), token)
    with pytest.raises(LayoutError, match="one class token"):
        ClassToken().to_hf(torch.randn(1, 8, 8))
    weight = torch.randn(8)
    kept, twin = WithUnused(fill=1.0).to_hf(weight)
    assert torch.equal(kept, weight) and torch.equal(twin, torch.ones(8))
    assert torch.equal(WithUnused(fill=1.0).from_hf([kept, twin], 2), weight)
    with pytest.raises(LayoutError, match="not 1.0 everywhere"):
        WithUnused(fill=1.0).from_hf([kept, torch.full((8,), 2.0)], 2)
    meta = torch.empty(8, device="meta")
    assert WithUnused(fill=0.0).from_hf(WithUnused(fill=0.0).to_hf(meta), 1).shape == (8,)
