"""A checkpoint written by NVIDIA's own NVLM-1.0 recipe code converts exactly.

`tests/fixtures/nvlm10-recipe` (made by scripts/fixtures/nvlm10_recipe.py; its README says how) holds
what Megatron-LM at tag NVLM-1.0 wrote from a tiny InternViT of the published class and a tiny Qwen2:
internvit_converter.py + tools/checkpoint/convert.py + combine_lm_vision_checkpoints.sh + the SFT
`save_checkpoint` at TP=8 (legacy `torch`), then pp_checkpoint_converter.py to PP=2, plus the logits of
NVIDIA's model on two recorded inputs. Such files carry numpy RNG globals, `ModelType(2)` (gone from
megatron-core >= 0.14) and args without any ViT size, and the converter must read them with its default
safe loading (no --trust-pickle), deriving the ViT sizes from tensor shapes and `vision_model_type`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TOKENIZER, cli, load_hf_tensors
from safetensors.torch import load_file

FIXTURE = REPO / "tests" / "fixtures" / "nvlm10-recipe"
SOURCES = ("sft-tp8", "sft-tp8-pp2")
TP = 8
REAL_HEADS, PADDED_HEADS = 25, 32
VOCAB = 1000  # the tiny tokenizer; Megatron pads the rows to 1024 at TP=8
# Measured on this fixture (fp32, CPU, torch 2.13): max |ours - NVIDIA's| over all positions and the
# 1000 real vocab entries is 3.5e-6 (text, 47 positions) and 6.5e-6 (image, 108 positions) with the
# default SDPA attention (2.8e-6 / 5.6e-6 eager); mean 5e-7 / 6e-7; logits reach |4.8|. NVIDIA's side
# sums over 8 TP ranks, ours in one GEMM: the bound leaves 3x room for that rounding order.
LOGITS_ATOL = 2e-5

pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason=f"{FIXTURE} is absent")


# -- reading NVIDIA's rank files without running their pickles ------------------------------------


class _Stub:
    """Any non-torch global of a rank file (args, ModelType, numpy RNG state, BytesIO): inert."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (
            module == "torch"
            or module.startswith("torch.")
            or (module, name) == ("collections", "OrderedDict")
        ):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": f"stub.{module}"})


_STUB_PICKLE = types.ModuleType("stub_pickle")
_STUB_PICKLE.Unpickler = _StubUnpickler
_STUB_PICKLE.load = pickle.load


def rank_model(path: Path) -> dict:
    """The `model` dict of a legacy rank file (tensors only), other globals stubbed."""
    state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_STUB_PICKLE)
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


# -- fixtures --------------------------------------------------------------------------------------


class _Converted(dict):
    """source name -> converted folder, converted on first use (one failure does not hide the others)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        code, output = cli("megatron-to-hf", FIXTURE / name, self.root / name, "--tokenizer", TINY_TOKENIZER)
        assert code == 0, output
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """NVIDIA-written checkpoints through `convert-checkpoint megatron-to-hf` (default safe loading)."""
    return _Converted(tmp_path_factory.mktemp("nvlm10"))


@pytest.fixture(scope="module")
def start_vit():
    return load_file(FIXTURE / "hf-internvit" / "model.safetensors")


@pytest.fixture(scope="module")
def start_llm():
    return load_file(FIXTURE / "hf-qwen2" / "model.safetensors")


@pytest.fixture(scope="module")
def recorded():
    return load_file(FIXTURE / "logits.safetensors")


def _vit_config():
    return json.loads((FIXTURE / "hf-internvit" / "config.json").read_text())


# -- the starting weights are the published layout ------------------------------------------------


def test_starting_vit_has_25_real_and_7_dummy_heads(start_vit):
    config = _vit_config()
    assert config["num_attention_heads"] == REAL_HEADS
    head_dim = config["hidden_size"] // REAL_HEADS
    real, padded = REAL_HEADS * head_dim, PADDED_HEADS * head_dim
    for layer in range(config["num_hidden_layers"]):
        prefix = f"encoder.layers.{layer}.attn."
        qkv = start_vit[prefix + "qkv.weight"]
        assert qkv.shape == (3 * padded, config["hidden_size"])
        blocks = qkv.view(3, padded, -1)
        assert torch.all(blocks[:, real:] == 0) and torch.all(blocks[:, :real].abs().sum(-1) > 0)
        for norm in ("q_norm.weight", "k_norm.weight"):
            assert start_vit[prefix + norm].shape == (padded,)
            assert torch.all(start_vit[prefix + norm][real:] == 0)
        assert start_vit[prefix + "proj.weight"].shape == (config["hidden_size"], padded)
        assert torch.all(start_vit[prefix + "proj.weight"][:, real:] == 0)


# -- weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_vision_tensors_are_the_starting_weights(converted, start_vit, source):
    """Every ViT tensor bit-identical to the published-class start (25 real heads and the zero dummies)."""
    hf = load_hf_tensors(converted[source])
    vision = {k[len("vision_model.") :]: v for k, v in hf.items() if k.startswith("vision_model.")}
    assert vision.keys() == start_vit.keys()
    for name, tensor in start_vit.items():
        assert vision[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(vision[name], tensor), name


@pytest.mark.parametrize("source", SOURCES)
def test_llm_tensors_are_the_starting_weights(converted, start_llm, source):
    hf = load_hf_tensors(converted[source])
    llm = {k[len("language_model.") :]: v for k, v in hf.items() if k.startswith("language_model.")}
    assert llm.keys() == start_llm.keys()
    for name, tensor in start_llm.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert llm[name].shape[0] >= VOCAB, name
            assert torch.equal(llm[name][:VOCAB], tensor[:VOCAB]), name
        else:
            assert torch.equal(llm[name], tensor), name


@pytest.mark.parametrize("source", SOURCES)
def test_projector_is_the_checkpoints(converted, source):
    """mlp1 = NVIDIA's vision_projection (its own seeded init: the recipe skips pretraining)."""
    shards = [
        rank_model(FIXTURE / "sft-tp8" / "iter_0000001" / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
        for r in range(TP)
    ]
    prefix = "vision_projection.encoder."
    for name in ("linear_fc1.layer_norm_weight", "linear_fc1.layer_norm_bias"):
        assert all(torch.equal(s[prefix + name], shards[0][prefix + name]) for s in shards), name
    expected = {
        "mlp1.0.weight": shards[0][prefix + "linear_fc1.layer_norm_weight"],
        "mlp1.0.bias": shards[0][prefix + "linear_fc1.layer_norm_bias"],
        "mlp1.1.weight": torch.cat([s[prefix + "linear_fc1.weight"] for s in shards], dim=0),
        "mlp1.3.weight": torch.cat([s[prefix + "linear_fc2.weight"] for s in shards], dim=1),
    }
    hf = load_hf_tensors(converted[source])
    assert {k for k in hf if k.startswith("mlp1.")} == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(hf[name], tensor), name


def test_tp_and_pp_sources_give_the_same_folder(converted):
    a, b = (load_hf_tensors(converted[s]) for s in SOURCES)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("source", SOURCES)
def test_config_is_derived_from_shapes(converted, source):
    """The args hold no ViT size: hidden, layers, heads (25 + 7 dummy), ffn, image size come from shapes."""
    vit = _vit_config()
    if True:
        config = json.loads((converted[source] / "config.json").read_text())
        vision = config["vision_config"]
        assert vision["hidden_size"] == vit["hidden_size"]
        assert vision["num_attention_heads"] == REAL_HEADS
        assert vision.get("num_dummy_heads", 7) == PADDED_HEADS - REAL_HEADS
        assert vision["num_hidden_layers"] == vit["num_hidden_layers"]
        assert vision["intermediate_size"] == vit["intermediate_size"]
        assert vision["image_size"] == vit["image_size"] and vision["patch_size"] == vit["patch_size"]
        llm = config["llm_config"]
        start = json.loads((FIXTURE / "hf-qwen2" / "config.json").read_text())
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
        ):
            assert llm[key] == start[key], key
        assert llm.get("rope_theta", (llm.get("rope_parameters") or {}).get("rope_theta")) == 1e6
        assert config.get("projector_layer_norm_eps") == 1e-6


# -- logits ----------------------------------------------------------------------------------------


def _hf_inputs(recorded, case: str, image_token_id: int):
    ids = recorded[f"{case}.combined_input_ids"].clone()
    ids[recorded[f"{case}.image_token_mask"].bool()] = image_token_id
    return ids, recorded.get(f"{case}.pixel_values")


@pytest.mark.parametrize("case", ("text", "image"))
def test_our_class_gives_nvidias_logits(converted, recorded, case):
    """NVLM_D_Model.from_pretrained(DST) on the recorded inputs = NVIDIA's model (fp32, TP=8 gloo)."""
    from modeling import NVLM_D_Model

    model = NVLM_D_Model.from_pretrained(converted["sft-tp8"], torch_dtype=torch.float32).eval()
    ids, pixels = _hf_inputs(recorded, case, model.img_context_token_id)
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=ids).logits
    expected = recorded[f"{case}.logits"]
    assert logits.shape[:2] == expected.shape[:2]
    diff = (logits[..., :VOCAB].float() - expected[..., :VOCAB]).abs().max().item()
    assert diff <= LOGITS_ATOL, diff
    assert torch.equal(logits[0, -1, :VOCAB].argmax(), expected[0, -1, :VOCAB].argmax())


_PUBLISHED_RUN = textwrap.dedent(
    """
    import importlib, json, shutil, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    sys.path.insert(0, SCRIPTS)
    from nvlm10_recipe import standins
    standins.install_timm_standin()
    standins.install_einops_standin()
    package = Path(WORK) / "published_nvlm_d"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    for name in ("configuration_intern_vit.py", "modeling_intern_vit.py", "configuration_nvlm_d.py",
                 "modeling_nvlm_d.py", "conversation.py"):
        shutil.copyfile(Path(PUBLISHED) / name, package / name)
    sys.path.insert(0, WORK)
    configuration = importlib.import_module("published_nvlm_d.configuration_nvlm_d")
    modeling = importlib.import_module("published_nvlm_d.modeling_nvlm_d")
    torch.distributed.init_process_group("gloo", init_method="file://" + WORK + "/pg", rank=0, world_size=1)
    raw = json.loads((Path(FOLDER) / "config.json").read_text())
    raw["llm_config"]["architectures"] = ["Qwen2ForCausalLM"]
    config = configuration.NVLM_D_Config(**raw)
    model = modeling.NVLM_D_Model(config).eval()
    model.load_state_dict(load_file(Path(FOLDER) / "model.safetensors"), strict=True)
    model.img_context_token_id = IMAGE_TOKEN
    recorded = load_file(RECORDED)
    out = {}
    for eps_name, eps in (("published_eps", None), ("megatron_eps", 1e-6)):
        if eps is not None:
            model.mlp1[0].eps = eps
        for case in ("text", "image"):
            ids = recorded[case + ".combined_input_ids"].clone()
            ids[recorded[case + ".image_token_mask"].bool()] = IMAGE_TOKEN
            pixels = recorded.get(case + ".pixel_values")
            flags = torch.ones(1, 1, dtype=torch.long)
            if pixels is None:
                pixels, flags = recorded["image.pixel_values"], torch.zeros(1, 1, dtype=torch.long)
            with torch.no_grad():
                logits = model(pixel_values=pixels, input_ids=ids, image_flags=flags).logits
            out[eps_name + "." + case] = logits
    torch.save(out, Path(WORK) / "published_logits.pt")
    """
)


def test_published_code_gives_nvidias_logits(converted, recorded, tmp_path):
    """The PUBLISHED remote code on the converted weights (set NVLM_PUBLISHED_CODE to its folder)."""
    published = os.environ.get("NVLM_PUBLISHED_CODE")
    if not published:
        pytest.skip("NVLM_PUBLISHED_CODE (folder of the published NVLM-D remote code) is not set")
    folder = converted["sft-tp8"]
    image_token = json.loads((folder / "config.json").read_text())["img_context_token_id"]
    script = "\n".join(
        [
            f"SCRIPTS = {str(REPO / 'scripts' / 'fixtures')!r}",
            f"WORK = {str(tmp_path)!r}",
            f"PUBLISHED = {published!r}",
            f"FOLDER = {str(folder)!r}",
            f"RECORDED = {str(FIXTURE / 'logits.safetensors')!r}",
            f"IMAGE_TOKEN = {image_token}",
            _PUBLISHED_RUN,
        ]
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = torch.load(tmp_path / "published_logits.pt")
    for case in ("text", "image"):
        expected = recorded[f"{case}.logits"][..., :VOCAB]
        # With Megatron's projector LayerNorm eps (1e-6) the published code matches NVIDIA's logits
        # (measured max 2.8e-6 text, 5.0e-6 image); with its own 1e-5 the image case is 2.7e-5 off.
        diff = (out[f"megatron_eps.{case}"][..., :VOCAB] - expected).abs().max().item()
        assert diff <= LOGITS_ATOL, (case, diff)
    # With its own 1e-5 only the image logits drift (NVLM_FACTS 6.1); the text ones cannot.
    assert (
        out["published_eps.text"][..., :VOCAB] - recorded["text.logits"][..., :VOCAB]
    ).abs().max() <= LOGITS_ATOL
    shutil.rmtree(tmp_path / "published_nvlm_d", ignore_errors=True)
