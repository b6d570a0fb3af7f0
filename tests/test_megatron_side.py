"""The Megatron side: NVLM-D built with Megatron-Core at several TP/PP sizes, and its checkpoints.

Every Megatron run happens in freshly spawned ranks (gloo on CPU), as it would on a cluster.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import make_megatron_checkpoint, tiny_inputs

pytest.importorskip("megatron.core", reason="megatron-core is needed for the Megatron side")

from modeling.megatron.args import padded_head_count  # noqa: E402
from modeling.megatron.builder import TILE_TAGS, ParallelLayout  # noqa: E402
from modeling.megatron.distributed import run_ranks  # noqa: E402
from modeling.megatron.runner import expand_image_tokens  # noqa: E402
from modeling.megatron.session import ForwardJob, ModelSource, forward_rank  # noqa: E402

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]


def load(path):
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cases(tiny_tokenizer):
    return tiny_inputs(tiny_tokenizer)


@pytest.fixture(scope="module")
def native_case(tiny_tokenizer):
    """A multi-tile prompt the way Megatron builds it: text pieces tokenized apart, ONE image token
    where the image goes, and the same sequence expanded for our entry point."""
    tags = [tiny_tokenizer(tag, add_special_tokens=False).input_ids for tag in TILE_TAGS]
    image_token = tiny_tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    before = tiny_tokenizer("<|im_start|>user\n<Image>", add_special_tokens=False).input_ids
    after = tiny_tokenizer(
        "</Image>\nWhat is shown?<|im_end|><|im_start|>assistant\n", add_special_tokens=False
    )
    native = torch.tensor([before + [image_token] + after.input_ids])
    expanded = expand_image_tokens(native, image_token, tags, num_tiles=3, tokens_per_tile=16)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return {"tags": tags, "native": native, "expanded": expanded, "pixels": pixels}


@pytest.fixture(scope="module")
def outputs(cases, native_case):
    """Seeded tiny model at each layout: logits and per-layer outputs for the same inputs; at PP=1
    also Megatron's own prompt path (one image token, tile tags inserted inside LLaVAModel)."""
    all_cases = cases + [{"input_ids": native_case["expanded"], "pixel_values": native_case["pixels"]}]
    native = [{"input_ids": native_case["native"], "pixel_values": native_case["pixels"], "num_tiles": 3}]
    results = {}
    for tp, pp in LAYOUTS:
        layout = ParallelLayout(tp, pp)
        job = ForwardJob(
            ModelSource("tiny"),
            layout,
            all_cases,
            collect_layers=True,
            native=native if pp == 1 else [],
            tile_tag_ids=native_case["tags"],
        )
        results[(tp, pp)] = run_ranks(forward_rank, layout, job)
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_logits_agree_across_tp_and_pp(outputs, layout):
    base = outputs[(1, 1)]["outputs"]
    for ours, ref in zip(outputs[layout]["outputs"], base):
        assert ours.logits.shape == ref.logits.shape
        assert ref.logits.abs().max() > 0.1  # not a trivially small output
        assert _rel(ours.logits, ref.logits) < 1e-5
        assert ours.logits.argmax(-1).equal(ref.logits.argmax(-1))


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_layer_outputs_agree_across_tp_and_pp(outputs, layout):
    base = outputs[(1, 1)]["outputs"][1].layers
    ours = outputs[layout]["outputs"][1].layers
    assert (
        sorted(ours)
        == sorted(base)
        == sorted(["vision.layers.0", "vision.layers.1", "projector", "llm.layers.0", "llm.layers.1"])
    )
    for name in base:
        assert _rel(ours[name], base[name]) < 1e-5, name


def test_megatron_prompt_path_matches_shared_ids(outputs):
    """LLaVAModel.forward (tile tags inserted inside the model) gives the logits of our entry point
    fed the expanded ids: the two prompt conventions describe the same sequence."""
    for layout in ((1, 1), (2, 1), (4, 1)):
        expanded = outputs[layout]["outputs"][2].logits
        native = outputs[layout]["native"][0]
        assert native.shape == expanded.shape
        assert _rel(native, expanded) < 1e-5


def test_padded_head_rule():
    assert [padded_head_count(25, tp) for tp in (1, 2, 4, 8)] == [25, 26, 28, 32]
    assert [padded_head_count(5, tp) for tp in (1, 2, 4)] == [5, 6, 8]


@pytest.fixture(scope="module")
def legacy_tp2_pp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-tp2-pp2"
    return make_megatron_checkpoint(out, "--preset", "tiny", "--tp", "2", "--pp", "2", "--format", "torch")


def test_legacy_layout_and_args(legacy_tp2_pp2):
    root = legacy_tp2_pp2
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    ranks = sorted(p.name for p in (root / "iter_0000001").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert not list(root.parent.glob(".*partial"))  # the temporary folder was renamed away
    first = load(root / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt")
    last = load(root / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt")
    assert set(first) == {"args", "checkpoint_version", "iteration", "model"}
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 1
    args = first["args"]
    assert isinstance(args, argparse.Namespace)
    for field in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "padded_vocab_size",
        "make_vocab_size_divisible_by",
        "norm_epsilon",
        "rotary_base",
        "untie_embeddings_and_output_weights",
        "swiglu",
        "add_qkv_bias",
        "vision_model_type",
        "encoder_num_layers",
        "img_h",
        "patch_dim",
        "pixel_shuffle",
        "use_tile_tags",
        "vision_projection_type",
    ):
        assert hasattr(args, field), field
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.padded_vocab_size == 1024 and args.num_query_groups == 4 and args.swiglu
    # stage 0 holds the vision model, projector and embeddings; the last stage the final norm and
    # the output layer; layer numbers restart at 0 on each stage.
    assert "vision_model.conv1.weight" in first["model"] and "vision_model.conv1.weight" not in last["model"]
    assert "language_model.embedding.word_embeddings.weight" in first["model"]
    assert "language_model.output_layer.weight" in last["model"]
    assert "language_model.decoder.final_layernorm.weight" in last["model"]
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.weight" in last["model"]
    assert "language_model.decoder.layers.1.self_attention.linear_qkv.weight" not in last["model"]
    assert first["model"]["language_model.embedding.word_embeddings.weight"].shape == (512, 128)  # vocab / TP


def test_dummy_heads_are_zero_on_the_last_rank(legacy_tp2_pp2):
    """5 real heads at TP=2 -> 6 heads, 3 a rank: rank 1 holds heads 3, 4 and the zero head 5."""
    model = load(legacy_tp2_pp2 / "iter_0000001" / "mp_rank_01_000" / "model_optim_rng.pt")["model"]
    prefix = "vision_model.decoder.layers.0.self_attention."
    qkv = model[prefix + "linear_qkv.weight"].view(3, 3, 16, 80)  # [heads, q/k/v, head_dim, C]
    assert qkv[2].count_nonzero() == 0 and qkv[:2].count_nonzero() == qkv[:2].numel()
    proj = model[prefix + "linear_proj.weight"].view(80, 3, 16)
    assert proj[:, 2].count_nonzero() == 0 and proj[:, :2].count_nonzero() == proj[:, :2].numel()
    assert model[prefix + "q_layernorm.weight"][32:].count_nonzero() == 0


def test_checkpoint_reloads_to_the_same_logits(legacy_tp2_pp2, outputs, cases):
    layout = ParallelLayout(2, 2)
    job = ForwardJob(ModelSource(checkpoint=str(legacy_tp2_pp2)), layout, cases)
    reloaded = run_ranks(forward_rank, layout, job)["outputs"]
    for ours, ref in zip(reloaded, outputs[(2, 2)]["outputs"][:2]):
        assert torch.equal(ours.logits, ref.logits)


def test_te_names(tmp_path):
    root = make_megatron_checkpoint(tmp_path / "te", "--preset", "tiny", "--spec", "te")
    model = load(root / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    layer = "language_model.decoder.layers.0."
    assert layer + "self_attention.linear_qkv.layer_norm_weight" in model
    assert layer + "mlp.linear_fc1.layer_norm_weight" in model
    assert layer + "input_layernorm.weight" not in model and layer + "pre_mlp_layernorm.weight" not in model
    extra = model[layer + "self_attention.core_attention._extra_state"]
    assert extra.dtype == torch.uint8 and extra.numel() == 0
    assert "vision_model.decoder.layers.0.input_layernorm.weight" in model  # the ViT keeps its norms
    assert "vision_projection.encoder.linear_fc1.layer_norm_weight" in model


def test_torch_dist_layout(tmp_path):
    root = make_megatron_checkpoint(
        tmp_path / "dist", "--preset", "tiny", "--tp", "2", "--format", "torch_dist"
    )
    it = root / "iter_0000001"
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (it / ".metadata").exists() and len(list(it.glob("__*_*.distcp"))) >= 2
    common = load(it / "common.pt")
    assert common["args"].tensor_model_parallel_size == 2 and common["checkpoint_version"] == 3.0

    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(it)).read_metadata().state_dict_metadata
    # tensors are GLOBAL and homogeneous layers are stacked on a leading axis
    assert tuple(meta["language_model.decoder.layers.self_attention.linear_qkv.weight"].size) == (2, 256, 128)
    assert tuple(meta["vision_model.decoder.layers.self_attention.linear_qkv.weight"].size) == (
        2,
        6 * 3 * 16,
        80,
    )
    assert tuple(meta["language_model.embedding.word_embeddings.weight"].size) == (1024, 128)


@pytest.mark.slow
def test_72b_shapes_only_at_tp8(shapes_only_72b):
    """The full nvlm-d-72b at TP=8 described without data, on a 2-core machine."""
    root = shapes_only_72b
    ranks = sorted((root / "iter_0000001").iterdir())
    assert [r.name for r in ranks] == [f"mp_rank_{i:02d}" for i in range(8)]
    model = load(ranks[7] / "model_optim_rng.pt")["model"]
    qkv = model["vision_model.decoder.layers.44.self_attention.linear_qkv.weight"]
    assert qkv.is_meta and tuple(qkv.shape) == (4 * 3 * 128, 3200)  # 32 heads / 8 ranks
    assert tuple(model["language_model.embedding.word_embeddings.weight"].shape) == (152576 // 8, 8192)
    assert tuple(model["language_model.decoder.layers.79.mlp.linear_fc1.weight"].shape) == (
        2 * 29568 // 8,
        8192,
    )
    total = 0
    for rank in ranks:
        for name, tensor in load(rank / "model_optim_rng.pt")["model"].items():
            if isinstance(tensor, torch.Tensor) and (rank == ranks[0] or _is_split(name)):
                total += tensor.numel()
    # the release's 79,379,593,344 parameters, plus Megatron's padding: 512 vocab rows in the
    # embedding and the output layer; no dummy heads beyond the release's 7 at TP=8.
    assert total == 79_379_593_344 + 2 * 512 * 8192


def _is_split(name: str) -> bool:
    split = (
        "word_embeddings.weight",
        "output_layer.weight",
        "linear_qkv.weight",
        "linear_qkv.bias",
        "linear_proj.weight",
        "linear_fc1.weight",
        "linear_fc1.bias",
        "linear_fc2.weight",
        "q_layernorm.weight",
        "k_layernorm.weight",
    )
    return name.endswith(split)
