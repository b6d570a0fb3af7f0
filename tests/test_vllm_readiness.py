"""A converted folder passes the checks vLLM's NVLM-D path makes, without installing vLLM.

vLLM (github.com/vllm-project/vllm) was read, not run: `vllm/model_executor/models/nvlm_d.py`,
`internvl.py`, `intern_vit.py` and `qwen2.py`, the registry (`models/registry.py`), its config
loading (`vllm/transformers_utils/config.py`, `configs/internvl.py`, `configs/nvlm_d.py`), the
dtype and length rules of `ModelConfig` and the prompt handling of `entrypoints/chat_utils.py`.
Each check below names the file and function it mirrors; the code is ours.

Two facts shape the checks:
- vLLM does not load our configuration_nvlm_d.py: `model_type` "NVLM_D" is in its own config
  registry (nvlm_d.py reads `config.text_config`, which neither the release's configuration file
  nor ours defines), whose class turns `vision_config` and `llm_config` into plain
  `PretrainedConfig`s. So
  every field vLLM reads must be written out in config.json (its defaults are not ours:
  `dynamic_image_size` False, `use_thumbnail` False, `ps_version` "v1", `tie_word_embeddings` True).
- vLLM builds its own modules from that config and loads the weights by name; a tensor it has no
  parameter for, or a parameter no tensor fills, stops the load. So the folder's names and shapes
  (safetensors headers) must equal what those modules declare.

The same mirror, applied to the published release (../shared/reference/nvlm-d-72b: config.json,
tensors.tsv), must accept it: that is the check on the mirror itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, TINY_TOKENIZER, cli, reference_file

SMALL = REPO / "tests" / "fixtures" / "nvlm-d-small-trained" / "megatron-tp2"
IMG_PAD = "<|vision_pad|>"
VLLM_DUMMY_HEADS = 7  # nvlm_d.py, NVLM_D_Model._init_vision_model: num_dummy_heads=7, hard-coded
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


# ------------------------------------------------------------------------------------------
# The mirror: what vLLM reads of config.json, and the parameters it builds from it
# ------------------------------------------------------------------------------------------


def vllm_config_problems(config: dict) -> list[str]:
    """Every check vLLM's config handling and NVLM-D model make on config.json; [] when all hold."""
    problems = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    # models/registry.py (_MULTIMODAL_MODELS "NVLM_D" -> nvlm_d.NVLM_D_Model); ModelConfig refuses a
    # config without architectures ("No model architectures are specified").
    need(config.get("architectures") == ["NVLM_D"], f"architectures {config.get('architectures')!r}")
    # transformers_utils/config.py get_config: model_type "NVLM_D" selects vLLM's NVLM_D_Config.
    need(config.get("model_type") == "NVLM_D", f"model_type {config.get('model_type')!r}")
    # configs/internvl.py InternVLChatConfig.__init__: these are read with defaults unlike ours, so
    # they must be stated; internvl.py BaseInternVLProcessor.__init__ asserts their types.
    top = {
        "vision_config": dict,
        "llm_config": dict,
        "select_layer": int,
        "downsample_ratio": float,
        "ps_version": str,
        "dynamic_image_size": bool,
        "use_thumbnail": bool,
        "min_dynamic_patch": int,
        "max_dynamic_patch": int,
    }
    for key, kind in top.items():
        need(isinstance(config.get(key), kind) and not (kind is int and isinstance(config[key], bool)), key)
    if problems:
        return problems
    vision, text = config["vision_config"], config["llm_config"]
    # internvl.py InternVLChatModel.pixel_shuffle: "v1" skips the last transpose; NVLM-D is "v2".
    need(config["ps_version"] == "v2", f"ps_version {config['ps_version']!r}")
    # internvl.py _init_mlp1 / nvlm_d.py _init_mlp1: width vit_hidden * int(1 / ratio) ** 2.
    need((1 / config["downsample_ratio"]).is_integer(), f"downsample_ratio {config['downsample_ratio']}")
    # InternVLChatModel.__init__ counts tokens per tile from force_image_size, BaseInternVLProcessor
    # tiles at vision_config.image_size: the two must be one size.
    need(
        config.get("force_image_size") in (None, vision.get("image_size")),
        f"force_image_size {config.get('force_image_size')} != vision_config.image_size",
    )
    # intern_vit.py InternVisionEmbeddings / InternParallelAttention / InternMLP /
    # InternVisionEncoderLayer read these from a plain PretrainedConfig (no defaults).
    for key in [
        "hidden_size",
        "image_size",
        "patch_size",
        "num_attention_heads",
        "intermediate_size",
        "num_hidden_layers",
        "layer_norm_eps",
        "hidden_act",
        "qkv_bias",
        "qk_normalization",
        "norm_type",
        "initializer_factor",
    ]:
        need(key in vision, f"vision_config.{key} missing")
    need(vision.get("norm_type") in ("rms_norm", "layer_norm"), "vision_config.norm_type (NORM2FN)")
    need(vision.get("num_dummy_heads", VLLM_DUMMY_HEADS) == VLLM_DUMMY_HEADS, "vision_config.num_dummy_heads")
    if "hidden_size" in vision and "num_attention_heads" in vision:
        need(vision["hidden_size"] % vision["num_attention_heads"] == 0, "vision head_dim")
    # internvl.py InternVLChatModel.__init__: text_config.architectures[0] picks the language model
    # (init_vllm_registered_model); "InternLM2VEForCausalLM" would switch to the mono path.
    need((text.get("architectures") or [None])[0] == "Qwen2ForCausalLM", "llm_config.architectures")
    # qwen2.py Qwen2DecoderLayer / Qwen2Attention / Qwen2MLP / Qwen2Model read these; a plain
    # PretrainedConfig would default tie_word_embeddings to True and drop lm_head.
    for key in [
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_theta",
        "hidden_act",
        "tie_word_embeddings",
    ]:
        need(key in text, f"llm_config.{key} missing")
    need(text.get("hidden_act") == "silu", "llm_config.hidden_act (Qwen2MLP: only silu)")
    if text.get("head_dim") is not None:  # Qwen2Attention: head_dim = hidden_size // heads
        need(text["head_dim"] * text["num_attention_heads"] == text["hidden_size"], "llm_config.head_dim")
    need(not text.get("use_sliding_window"), "llm_config.use_sliding_window")
    # transformers_utils/config.py patch_rope_scaling_dict: a rope_scaling needs "type" or
    # "rope_type" (equal when both are there).
    rope = text.get("rope_scaling")
    if rope is not None:
        kinds = {rope[k] for k in ("type", "rope_type") if k in rope}
        need(len(kinds) == 1, f"llm_config.rope_scaling {rope!r}")
    # config.py ModelConfig _find_dtype: the top-level torch_dtype (transformers 4.x's name).
    need(config.get("torch_dtype") in DTYPES, f"torch_dtype {config.get('torch_dtype')!r}")
    return problems


def vllm_max_model_len(config: dict) -> int:
    """ModelConfig._get_and_verify_max_len: max_position_embeddings, times a rope_scaling factor."""
    text = config["llm_config"]
    length = text["max_position_embeddings"]
    rope = text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    if rope and kind not in ("su", "longrope", "llama3"):
        length *= rope.get("factor", 1.0)
    return int(length)


def vllm_parameters(config: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint names and shapes vLLM's NVLM_D_Model declares for `config` (what its
    AutoWeightsLoader fills and DefaultModelLoader requires filled)."""
    vision, text = config["vision_config"], config["llm_config"]
    hidden, heads = vision["hidden_size"], vision["num_attention_heads"]
    head_dim = hidden // heads
    padded = (heads + VLLM_DUMMY_HEADS) * head_dim  # InternParallelAttention.dummy_dim
    inner, patch = vision["intermediate_size"], vision["patch_size"]
    select = config["select_layer"]  # NVLM_D_Model._init_vision_model: layers up to select_layer
    layers = vision["num_hidden_layers"] + select + 1 if select < 0 else select + 1
    out = {
        "vision_model.embeddings.class_embedding": (1, 1, hidden),
        "vision_model.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
        "vision_model.embeddings.patch_embedding.bias": (hidden,),
        "vision_model.embeddings.position_embedding": (1, (vision["image_size"] // patch) ** 2 + 1, hidden),
    }
    norm_bias = vision["norm_type"] == "layer_norm"
    for i in range(layers):
        at = f"vision_model.encoder.layers.{i}."
        out[at + "attn.qkv.weight"] = (3 * padded, hidden)
        if vision["qkv_bias"]:
            out[at + "attn.qkv.bias"] = (3 * padded,)
        if vision["qk_normalization"]:
            out[at + "attn.q_norm.weight"] = out[at + "attn.k_norm.weight"] = (padded,)
        out[at + "attn.proj.weight"], out[at + "attn.proj.bias"] = (hidden, padded), (hidden,)
        out[at + "mlp.fc1.weight"], out[at + "mlp.fc1.bias"] = (inner, hidden), (inner,)
        out[at + "mlp.fc2.weight"], out[at + "mlp.fc2.bias"] = (hidden, inner), (hidden,)
        for norm in ("norm1", "norm2"):
            out[at + f"{norm}.weight"] = (hidden,)
            if norm_bias:
                out[at + f"{norm}.bias"] = (hidden,)
        out[at + "ls1"] = out[at + "ls2"] = (hidden,)
    # nvlm_d.py NVLM_D_Model._init_mlp1: LayerNorm, Linear to the LLM's intermediate size (no bias),
    # GELU, Linear to the LLM's hidden size (no bias).
    wide = hidden * int(1 / config["downsample_ratio"]) ** 2
    llm_hidden, llm_inner = text["hidden_size"], text["intermediate_size"]
    out.update(
        {
            "mlp1.0.weight": (wide,),
            "mlp1.0.bias": (wide,),
            "mlp1.1.weight": (llm_inner, wide),
            "mlp1.3.weight": (llm_hidden, llm_inner),
        }
    )
    # qwen2.py: Qwen2Model / Qwen2DecoderLayer (q/k/v with bias, stacked into qkv_proj on load),
    # Qwen2ForCausalLM (lm_head unless tied).
    q_heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    dim = llm_hidden // q_heads
    model = "language_model.model."
    out[model + "embed_tokens.weight"] = (text["vocab_size"], llm_hidden)
    for i in range(text["num_hidden_layers"]):
        at = f"{model}layers.{i}."
        for name, rows in (("q_proj", q_heads * dim), ("k_proj", kv_heads * dim), ("v_proj", kv_heads * dim)):
            out[at + f"self_attn.{name}.weight"], out[at + f"self_attn.{name}.bias"] = (
                (rows, llm_hidden),
                (rows,),
            )
        out[at + "self_attn.o_proj.weight"] = (llm_hidden, q_heads * dim)
        out[at + "mlp.gate_proj.weight"] = out[at + "mlp.up_proj.weight"] = (llm_inner, llm_hidden)
        out[at + "mlp.down_proj.weight"] = (llm_hidden, llm_inner)
        out[at + "input_layernorm.weight"] = out[at + "post_attention_layernorm.weight"] = (llm_hidden,)
    out[model + "norm.weight"] = (llm_hidden,)
    if not text["tie_word_embeddings"]:
        out["language_model.lm_head.weight"] = (text["vocab_size"], llm_hidden)
    return out


def folder_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors headers (no tensor data read), as vLLM's
    safetensors iterator sees them: only files the index lists, where there is an index
    (model_loader/weight_utils.py filter_duplicate_safetensors_files)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        assert {f.name for f in files} == listed, "shard files outside the index would be skipped"
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                piece = handle.get_slice(name)
                found[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return found


def vllm_image_prompt(tokenizer, question: str, num_patches: int, num_image_token: int) -> str:
    """The prompt vLLM's server builds for one image: chat_utils._get_full_multimodal_text_prompt
    puts the "<image>" placeholder and the text on lines of one message, the folder's chat
    template renders it, and nvlm_d.py NVLMMultiModalProcessor._get_prompt_updates replaces
    "<image>\\n" by NVLMProcessor.get_image_repl (tile tags, 256 <|vision_pad|> each, <Image>
    tags) plus "\\n"."""
    content = "\n".join(["<image>", question])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert "<image>\n" in text, text
    return text.replace("<image>\n", vllm_image_replacement(num_patches, num_image_token) + "\n", 1)


def vllm_image_replacement(num_patches: int, num_image_token: int) -> str:
    """nvlm_d.py NVLMProcessor.get_image_repl, with use_thumbnail (the thumbnail tag last)."""
    tags = [f"<tile_{i}>" for i in range(1, num_patches)] + ["<tile_global_thumbnail>"]
    return "<Image>" + "".join(tag + IMG_PAD * num_image_token for tag in tags) + "</Image>"


def placeholder_found(tokenizer, prompt: str, num_patches: int, num_image_token: int) -> bool:
    """multimodal/processing.py: vLLM finds each image's placeholder by its token ids inside the
    prompt's token ids; a BPE merge across the placeholder's edges would hide it. The placeholder is
    nvlm_d.py's replacement with its trailing "\n" (Qwen2's BPE merges ">\n" into one token)."""
    ids = tokenizer(prompt).input_ids
    replacement = vllm_image_replacement(num_patches, num_image_token) + "\n"
    piece = tokenizer(replacement, add_special_tokens=False).input_ids
    pad = tokenizer.convert_tokens_to_ids(IMG_PAD)
    inside = any(ids[i : i + len(piece)] == piece for i in range(len(ids) - len(piece) + 1))
    return inside and ids.count(pad) == num_patches * num_image_token == piece.count(pad)


# ------------------------------------------------------------------------------------------
# The mirror against the published release (its check), then against our folders
# ------------------------------------------------------------------------------------------


def _release_tensors() -> dict[str, tuple[tuple[int, ...], str]]:
    rows = reference_file("tensors.tsv").read_text().splitlines()[1:]
    return {
        name: (tuple(int(s) for s in shape.split(",")), dtype)
        for name, shape, dtype, _shard in (row.split("\t") for row in rows)
    }


def test_the_mirror_accepts_the_release():
    release = json.loads(reference_file("config.json").read_text())
    assert vllm_config_problems(release) == []
    expected = vllm_parameters(release)
    published = _release_tensors()
    assert set(expected) == set(published) and len(expected) == 1556
    assert {name: shape for name, (shape, _) in published.items()} == expected
    assert vllm_max_model_len(release) == 3 * 32768  # the dynamic x3 scaling the release states


def test_the_72b_preset_has_the_parameters_vllm_declares_for_the_release():
    """Our nvlm-d-72b config, as save_pretrained writes it, against the release's index (names and
    shapes; our converted 72B plan equals that index: test_conversion's dry-run test)."""
    import torch

    from converter.families import NVLMD
    from converter.tokenizer_folder import TokenizerInfo
    from modeling import get_config

    # the converter's path from a 72B checkpoint's args (as hf-to-megatron writes them) to config.json
    args = NVLMD.megatron_args(
        get_config("nvlm-d-72b"), 8, 1, dtype=torch.bfloat16, divisible_by=128, tokenizer_vocab=151665
    )
    tokenizer = TokenizerInfo(size=151665, image_token_id=151654, eos_token_id=151645, pad_token_id=151643)
    config = NVLMD.hf_config(args, tokenizer=tokenizer)
    config.dtype = torch.bfloat16  # what --dtype official records
    ours = config.to_dict()
    assert vllm_config_problems(ours) == []
    index = json.loads(reference_file("model.safetensors.index.json").read_text())
    assert set(vllm_parameters(ours)) == set(index["weight_map"])
    assert vllm_parameters(ours) == {name: shape for name, (shape, _) in _release_tensors().items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    dst = tmp_path_factory.mktemp("vllm") / "hf"
    code, output = cli("megatron-to-hf", SMALL, dst, "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    return dst


def test_converted_config_passes_every_vllm_check(folder):
    config = json.loads((folder / "config.json").read_text())
    assert vllm_config_problems(config) == []
    # without --reference-config nothing is invented: vLLM serves the checkpoint's own length
    assert vllm_max_model_len(config) == config["llm_config"]["max_position_embeddings"]


def test_converted_weights_are_exactly_what_vllm_loads(folder):
    config = json.loads((folder / "config.json").read_text())
    found = folder_tensors(folder)
    expected = vllm_parameters(config)
    assert sorted(set(expected) - set(found)) == [], "parameters vLLM would leave unfilled"
    assert sorted(set(found) - set(expected)) == [], "tensors vLLM has no parameter for"
    assert {name: shape for name, (shape, _) in found.items()} == expected
    # the dtype vLLM takes for the model (torch_dtype) is the weights' own
    assert {dtype for _, dtype in found.values()} == {DTYPES[config["torch_dtype"]]}


def test_converted_tokenizer_and_chat_template_give_vllm_the_prompt_chat_builds(folder):
    from transformers import AutoTokenizer

    from modeling.processing_nvlm_d import build_prompt

    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # nvlm_d.py NVLMProcessor.image_token_id: the id of <|vision_pad|> in the tokenizer's vocab
    assert tokenizer.get_vocab()[IMG_PAD] == config["img_context_token_id"]
    vision = config["vision_config"]
    num_image_token = int(
        (vision["image_size"] // vision["patch_size"]) ** 2 * config["downsample_ratio"] ** 2
    )
    # chat_utils: a template that iterates over content parts gets the image as a part
    parts = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    as_parts = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    as_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is shown?"}], tokenize=False
    )
    assert as_parts == as_text
    for num_patches in (1, 3, 7):
        prompt = vllm_image_prompt(tokenizer, "What is shown?", num_patches, num_image_token)
        assert prompt == build_prompt("What is shown?", [num_patches], num_image_token)
        assert placeholder_found(tokenizer, prompt, num_patches, num_image_token)


def test_release_tokenizer_keeps_vllm_placeholders_whole(folder, tmp_path):
    """Qwen2's BPE, where tags merge ("<Image><tile" -> "<Image", "><", "tile"): the placeholder
    vLLM searches for must still be a run of the prompt's ids."""
    from transformers import AutoTokenizer

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(reference_file(name), tmp_path / name)
    shutil.copyfile(folder / "chat_template.jinja", tmp_path / "chat_template.jinja")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.get_vocab()[IMG_PAD] == 151654
    for num_patches in (1, 7):
        prompt = vllm_image_prompt(tokenizer, "Describe the chart.", num_patches, 256)
        assert placeholder_found(tokenizer, prompt, num_patches, 256)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda c: c.update(architectures=None), "architectures None"),
        (lambda c: c.pop("ps_version"), "ps_version"),
        (lambda c: c.update(use_thumbnail=1), "use_thumbnail"),
        (lambda c: c["llm_config"].pop("tie_word_embeddings"), "llm_config.tie_word_embeddings missing"),
        (lambda c: c["vision_config"].update(num_dummy_heads=3), "vision_config.num_dummy_heads"),
        (lambda c: c["llm_config"].update(rope_scaling={"factor": 3.0}), "llm_config.rope_scaling"),
        (lambda c: c.update(force_image_size=448), "force_image_size 448"),
    ],
)
def test_the_mirror_refuses_what_vllm_refuses(folder, edit, problem):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    assert any(problem in text for text in vllm_config_problems(config)), vllm_config_problems(config)


def _serve_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_vllm", REPO / "scripts" / "serve_vllm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_script_hf_half_answers_both_prompts(folder):
    """scripts/serve_vllm.py without its vLLM half: the prompts it gives both engines and the
    greedy ids of the folder's remote code (CPU)."""
    from transformers import AutoProcessor

    serve = _serve_script()
    cases = serve.prompts(AutoProcessor.from_pretrained(folder, trust_remote_code=True), serve.drawn_image())
    assert [name for name, _, _ in cases] == ["text", "image"]
    assert "<image>\n" in cases[1][1] and "<image>" not in cases[0][1]
    answers = serve.hf_answers(folder, cases, "float32", 4)
    assert len(answers) == 2 and all(answers) and all(isinstance(i, int) for ids in answers for i in ids)


def test_serve_script_without_vllm_is_one_line_exit_2(folder):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: run scripts/serve_vllm.py itself")
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "serve_vllm.py"), str(folder)], capture_output=True, text=True
    )
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: vLLM is not installed here (pip install vllm; it needs a CUDA GPU)"
    ]
