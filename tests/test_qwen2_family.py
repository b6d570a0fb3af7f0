"""The Qwen2 LLM-only family: a plain Megatron GPT checkpoint of a Qwen2 model <-> Qwen2ForCausalLM.

A small random transformers Qwen2 (GQA: 4 query heads over 2 KV groups, QKV bias, SwiGLU, untied
embeddings) goes through the real CLI: HF -> Megatron (legacy TP=2 PP=2, TP=1, torch_dist) and back.
The Megatron files must hold plain GPTModel names, the way back must be bit-exact, and
megatron-core's own GPTModel, loading the files the CLI wrote, must compute the HF model's logits.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, load_hf_tensors

from converter.errors import ConversionError

HIDDEN, HEADS, GROUPS, FFN, LAYERS, VOCAB = 64, 4, 2, 128, 2, 256
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS = 1_000_000.0, 1e-5  # not transformers' defaults: they must travel through args


def _load_rank(path: Path) -> dict:
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)


def _rank_file(root: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return root / "iter_0000001" / name / "model_optim_rng.pt"


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def save_qwen2(folder: Path, **overrides):
    """A random Qwen2ForCausalLM saved with save_pretrained. Every tensor is random (biases and norm
    weights included: transformers initialises those to 0 and 1, which would hide a mix-up)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    settings = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rope_theta=ROPE_THETA,
        rms_norm_eps=RMS_EPS,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(Qwen2Config(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2") / "hf"
    return folder, save_qwen2(folder)


@pytest.fixture(scope="module")
def reference_logits(hf_source):
    _, model = hf_source
    with torch.no_grad():
        return model(_input_ids()).logits


@pytest.fixture(scope="module")
def megatron(hf_source):
    """`hf-to-megatron` at TP=2 PP=2 and TP=1 (legacy) and TP=2 torch_dist, by the real CLI."""
    folder, _ = hf_source
    made = {}
    for key, extra in {
        "tp2-pp2": ("--tp", "2", "--pp", "2"),
        "tp1": (),
        "dist": ("--tp", "2", "--format", "torch_dist"),
    }.items():
        out = folder.parent / key
        code, output = cli("hf-to-megatron", folder, out, *extra)
        assert code == 0, output
        made[key] = out
    return made


def test_legacy_files_hold_plain_gpt_names(megatron):
    root = megatron["tp2-pp2"]
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    ranks = sorted(p.name for p in (root / "iter_0000001").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    layer = [
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
        "input_layernorm.weight",
        "pre_mlp_layernorm.weight",
    ]
    # one layer per stage; layer numbers restart at 0 on every pipeline stage
    first = {"embedding.word_embeddings.weight"} | {f"decoder.layers.0.{n}" for n in layer}
    last = {f"decoder.layers.0.{n}" for n in layer} | {
        "decoder.final_layernorm.weight",
        "output_layer.weight",
    }
    for tp_rank in range(2):
        for pp_rank, names in enumerate((first, last)):
            state = _load_rank(_rank_file(root, tp_rank, pp_rank, 2))
            assert set(state["model"]) == names
            assert not any(k.startswith("language_model.") for k in state["model"])
    state = _load_rank(_rank_file(root, 1, 1, 2))
    model, args = state["model"], state["args"]
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 1
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups) == (
        LAYERS,
        HIDDEN,
        HEADS,
        GROUPS,
    )
    assert args.padded_vocab_size == VOCAB and args.untie_embeddings_and_output_weights
    assert args.rotary_base == ROPE_THETA and args.norm_epsilon == RMS_EPS
    # shapes of one TP rank: column-parallel halves dim 0, row-parallel dim 1, norms whole
    qkv_rows = (HEADS + 2 * GROUPS) * HEAD_DIM
    assert tuple(model["decoder.layers.0.self_attention.linear_qkv.weight"].shape) == (qkv_rows // 2, HIDDEN)
    assert tuple(model["decoder.layers.0.self_attention.linear_proj.weight"].shape) == (HIDDEN, HIDDEN // 2)
    assert tuple(model["decoder.layers.0.mlp.linear_fc1.weight"].shape) == (FFN, HIDDEN)
    assert tuple(model["decoder.layers.0.mlp.linear_fc2.weight"].shape) == (HIDDEN, FFN // 2)
    assert tuple(model["output_layer.weight"].shape) == (VOCAB // 2, HIDDEN)
    assert tuple(model["decoder.final_layernorm.weight"].shape) == (HIDDEN,)


def test_legacy_layout_is_megatrons(megatron, hf_source):
    """Layouts checked against HF tensors independently of mappings/transforms.py: fused QKV rows
    grouped per KV group [q heads of g | k_g | v_g], groups split over TP; a legacy fc1 rank holds
    [gate_r; up_r]; stage 1's layer 0 is HF layer 1."""
    folder, _ = hf_source
    hf = load_hf_tensors(folder)
    root = megatron["tp2-pp2"]
    for tp_rank in range(2):
        model = _load_rank(_rank_file(root, tp_rank, 1, 2))["model"]
        prefix = "model.layers.1."
        q = hf[prefix + "self_attn.q_proj.weight"].reshape(GROUPS, HEADS // GROUPS * HEAD_DIM, HIDDEN)
        k = hf[prefix + "self_attn.k_proj.weight"].reshape(GROUPS, HEAD_DIM, HIDDEN)
        v = hf[prefix + "self_attn.v_proj.weight"].reshape(GROUPS, HEAD_DIM, HIDDEN)
        g = tp_rank  # one KV group per TP rank
        assert torch.equal(
            model["decoder.layers.0.self_attention.linear_qkv.weight"], torch.cat([q[g], k[g], v[g]])
        )
        gate = hf[prefix + "mlp.gate_proj.weight"].chunk(2)[tp_rank]
        up = hf[prefix + "mlp.up_proj.weight"].chunk(2)[tp_rank]
        assert torch.equal(model["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate, up]))
        assert torch.equal(
            model["decoder.layers.0.input_layernorm.weight"], hf[prefix + "input_layernorm.weight"]
        )


@pytest.mark.parametrize("key", ["tp2-pp2", "dist"])
def test_back_to_hf_is_bit_exact(megatron, hf_source, reference_logits, key, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    folder, _ = hf_source
    out = tmp_path / "hf2"
    code, output = cli("megatron-to-hf", megatron[key], out, "--no-tokenizer")
    assert code == 0, output
    assert "qwen2: 17 source tensors -> 27 HF tensors" in output
    original, converted = load_hf_tensors(folder), load_hf_tensors(out)
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    for field in (
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "vocab_size",
    ):
        assert config[field] == source[field], field
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model) is Qwen2ForCausalLM
    with torch.no_grad():
        assert torch.equal(model(_input_ids()).logits, reference_logits)


def test_dry_run_plan_and_inspect(megatron, tmp_path):
    plan_path = tmp_path / "plan.json"
    code, output = cli("megatron-to-hf", megatron["tp2-pp2"], "--dry-run", "--plan-json", plan_path)
    assert code == 0, output
    assert "torch, TP=2 PP=2, qwen2:" in output and not (tmp_path / "hf").exists()
    plan = json.loads(plan_path.read_text())["tensors"]
    assert plan["model.embed_tokens.weight"] == {
        "shape": [VOCAB, HIDDEN],
        "dtype": "float32",
        "shard": "model.safetensors",
    }
    assert plan["model.layers.1.self_attn.k_proj.bias"]["shape"] == [GROUPS * HEAD_DIM]
    code, output = cli("inspect", megatron["tp2-pp2"])
    assert code == 0, output
    assert re.search(r"parallel layout\s+TP=2 PP=2 VP=1", output)
    assert re.search(r"num_query_groups\s+2\n", output) and re.search(r"tensors\s+17\n", output)


def test_reshard_pads_the_vocab_and_stays_exact(megatron, hf_source, tmp_path):
    """TP=4: Megatron pads the vocab to 128 x 4 = 512 rows (zeros); the way back drops them."""
    folder, _ = hf_source
    code, output = cli("reshard", megatron["tp2-pp2"], tmp_path / "tp4", "--tp", "4")
    assert code == 0, output
    shard = _load_rank(_rank_file(tmp_path / "tp4", 3, 0, 1))["model"]["output_layer.weight"]
    assert tuple(shard.shape) == (512 // 4, HIDDEN) and not shard.any()  # rank 3: padding rows only
    code, output = cli("megatron-to-hf", tmp_path / "tp4", tmp_path / "hf", "--no-tokenizer")
    assert code == 0, output
    original, converted = load_hf_tensors(folder), load_hf_tensors(tmp_path / "hf")
    assert all(torch.equal(converted[name], tensor) for name, tensor in original.items())


# -- traps ---------------------------------------------------------------------------------------


def test_the_library_api_writes_what_the_cli_writes(megatron, hf_source, tmp_path):
    """converter/api.py under the click commands: the same folders, byte for byte, and inspect's rows."""
    from converter import api

    folder, _ = hf_source
    lines = []
    api.convert_hf_to_megatron(folder, tmp_path / "tp2-pp2", tp=2, pp=2, log=lines.append)
    assert lines == [f"wrote {tmp_path / 'tp2-pp2'}: TP=2 PP=2 torch"]
    for ours in sorted((tmp_path / "tp2-pp2").rglob("*")):
        if ours.is_file():
            assert (
                ours.read_bytes()
                == (megatron["tp2-pp2"] / ours.relative_to(tmp_path / "tp2-pp2")).read_bytes()
            )
    options = api.ConvertOptions(no_tokenizer=True, dtype="bf16")
    api.convert_megatron_to_hf(megatron["tp2-pp2"], tmp_path / "by-api", options, log=lines.append)
    code, output = cli(
        "megatron-to-hf", megatron["tp2-pp2"], tmp_path / "by-cli", "--no-tokenizer", "--dtype", "bf16"
    )
    assert code == 0, output
    by_cli = sorted(p.name for p in (tmp_path / "by-cli").iterdir())
    assert sorted(p.name for p in (tmp_path / "by-api").iterdir()) == by_cli
    for name in by_cli:
        assert (tmp_path / "by-api" / name).read_bytes() == (tmp_path / "by-cli" / name).read_bytes(), name
    rows = dict(api.inspect(megatron["tp2-pp2"]))
    assert rows["parallel layout"] == "TP=2 PP=2 VP=1" and rows["num_layers"] == 2
    with pytest.raises(ConversionError, match="tokenizer"):
        api.convert_megatron_to_hf(megatron["tp1"], tmp_path / "none", api.ConvertOptions())


def _edited_copy(source: Path, dest: Path, edit) -> Path:
    """A copy of a TP=1 PP=1 legacy checkpoint with its rank file edited by `edit(state)`."""
    shutil.copytree(source, dest)
    path = _rank_file(dest, 0, 0, 1)
    state = _load_rank(path)
    edit(state)
    torch.save(state, path)
    return dest


def _te_spelling(state):
    """What Transformer Engine's GPT layer spec saves: input norms fused into the next linear,
    plus (empty, FP8 off) _extra_state entries, which the table ignores."""
    model = state["model"]
    for i in range(LAYERS):
        layer = f"decoder.layers.{i}."
        model[layer + "self_attention.linear_qkv.layer_norm_weight"] = model.pop(
            layer + "input_layernorm.weight"
        )
        model[layer + "mlp.linear_fc1.layer_norm_weight"] = model.pop(layer + "pre_mlp_layernorm.weight")
        for module in ("self_attention.linear_qkv", "self_attention.core_attention", "mlp.linear_fc1"):
            model[f"{layer}{module}._extra_state"] = torch.empty(0, dtype=torch.uint8)


def test_transformer_engine_names_convert_the_same(megatron, hf_source, tmp_path):
    folder, _ = hf_source
    te = _edited_copy(megatron["tp1"], tmp_path / "te", _te_spelling)
    code, output = cli("megatron-to-hf", te, tmp_path / "hf", "--no-tokenizer")
    assert code == 0, output
    original, converted = load_hf_tensors(folder), load_hf_tensors(tmp_path / "hf")
    assert set(converted) == set(original)
    assert all(torch.equal(converted[name], tensor) for name, tensor in original.items())


def test_both_norm_spellings_are_refused(megatron, tmp_path):
    def both(state):
        norm = state["model"]["decoder.layers.0.input_layernorm.weight"]
        state["model"]["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] = norm.clone()

    code, output = cli("megatron-to-hf", _edited_copy(megatron["tp1"], tmp_path / "m", both), "--dry-run")
    assert code == 2 and "model.layers.0.input_layernorm.weight would be written twice" in output


def test_args_that_disagree_with_the_tensors_are_refused(megatron, tmp_path):
    def mha(state):  # claims 4 KV groups: the fused QKV has rows for 2
        state["args"].num_query_groups = HEADS

    code, output = cli("megatron-to-hf", _edited_copy(megatron["tp1"], tmp_path / "m", mha), "--dry-run")
    assert code == 2 and "does not fit row 'gqa_qkv'" in output


def test_unknown_tensor_is_refused(megatron, tmp_path):
    def extra(state):
        state["model"]["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(HEAD_DIM)

    code, output = cli("megatron-to-hf", _edited_copy(megatron["tp1"], tmp_path / "m", extra), "--dry-run")
    assert code == 2 and "tensors no mapping row knows: decoder.layers.0.self_attention.q_layernorm" in output


def test_tied_embeddings_round_trip(tmp_path):
    save_qwen2(tmp_path / "hf", tie_word_embeddings=True)
    code, output = cli("hf-to-megatron", tmp_path / "hf", tmp_path / "meg")
    assert code == 0, output
    code, output = cli("megatron-to-hf", tmp_path / "meg", tmp_path / "hf2", "--no-tokenizer")
    assert code == 0, output


def test_vocab_not_a_multiple_of_128_round_trips(tmp_path):
    save_qwen2(tmp_path / "hf", vocab_size=200)
    code, output = cli("hf-to-megatron", tmp_path / "hf", tmp_path / "meg", "--tp", "2")
    assert code == 0, output
    code, output = cli("megatron-to-hf", tmp_path / "meg", tmp_path / "hf2", "--no-tokenizer")
    assert code == 0, output
    embed = load_hf_tensors(tmp_path / "hf2")["model.embed_tokens.weight"]
    assert tuple(embed.shape) == (200, HIDDEN)


def test_make_vocab_size_divisible_by_pads_the_tensors(hf_source, tmp_path):
    folder, _ = hf_source
    code, output = cli(
        "hf-to-megatron", folder, tmp_path / "meg", "--tp", "2", "--make-vocab-size-divisible-by", "256"
    )
    assert code == 0, output
    state = _load_rank(_rank_file(tmp_path / "meg", 0, 0, 1))
    rows = state["model"]["embedding.word_embeddings.weight"].shape[0]
    assert rows * 2 == state["args"].padded_vocab_size == 512


# -- megatron-core's GPTModel on the files the CLI wrote -----------------------------------------


def _gpt_model(args, tp: int, pp: int, pp_rank: int):
    """megatron-core's GPTModel for one stage, configured as modeling/megatron/builder.py configures
    NVLM-D's language model (language_config, the local layer spec), from the checkpoint's args."""
    from types import SimpleNamespace

    from megatron.core.models.gpt import GPTModel

    from converter.families import Qwen2
    from modeling.megatron.builder import ParallelLayout, language_config, language_layer_spec

    config = language_config(
        SimpleNamespace(llm_config=Qwen2.hf_config(args)), ParallelLayout(tp, pp), torch.float32, cpu=True
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=language_layer_spec(use_te=False),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        parallel_output=False,  # logits gathered over TP
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=args.rotary_base,
    ).eval()


def _load(checkpoint: Path, tp: int, pp: int, tp_rank: int, pp_rank: int):
    """This rank's model with the checkpoint loaded the way Megatron-LM loads it: a legacy rank
    file with load_state_dict(strict=True), a torch_dist folder with dist_checkpointing.load
    (Megatron-LM's default strictness) at whatever TP/PP this run has."""
    iteration = checkpoint / "iter_0000001"
    if (iteration / "metadata.json").exists():
        from megatron.core import dist_checkpointing

        model = _gpt_model(_load_rank(iteration / "common.pt")["args"], tp, pp, pp_rank)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(iteration))
        state = {k: v for k, v in state.items() if k in model.state_dict()}
    else:
        saved = _load_rank(_rank_file(checkpoint, tp_rank, pp_rank, pp))
        model, state = _gpt_model(saved["args"], tp, pp, pp_rank), saved["model"]
    model.load_state_dict(state, strict=True)
    return model


def megatron_gpt_logits(rank: int, checkpoints: list[str], input_ids: torch.Tensor):
    """In a rank started by run_ranks (so at module level: spawned ranks import it by name): for
    each checkpoint, the logits over the first VOCAB entries on rank 0, or the error text."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == pp - 1
    batch, seq = input_ids.shape
    results = []
    for checkpoint in checkpoints:
        try:
            model = _load(Path(checkpoint), tp, pp, tp_rank, pp_rank)
        except (Exception, CheckpointException) as exc:  # reported by the test (every rank fails alike)
            results.append(f"{type(exc).__name__}: {exc}"[:2000])
            continue
        with torch.no_grad():
            if not first:
                received = torch.empty(seq, batch, model.config.hidden_size)
                dist.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(received)
            output = model(input_ids=input_ids if first else None, position_ids=None, attention_mask=None)
            if not last:
                dist.send(output.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        # the last stage holds the TP-gathered logits; its TP rank 0 hands them to global rank 0
        if last and tp_rank == 0 and rank != 0:
            dist.send(output.contiguous(), dst=0)
        elif rank == 0 and not last:
            output = torch.empty(batch, seq, model.vocab_size)
            dist.recv(output, src=ps.get_pipeline_model_parallel_last_rank())
        results.append(output[..., :VOCAB].clone() if rank == 0 else None)
    return results


@pytest.fixture(scope="module")
def megatron_tp1(megatron):
    """One TP=1 rank: the legacy TP=1 checkpoint and the torch_dist one (written at TP=2)."""
    pytest.importorskip("megatron.core", reason="megatron-core is needed for the Megatron side")
    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks

    paths = [str(megatron["tp1"]), str(megatron["dist"])]
    legacy, torch_dist = run_ranks(megatron_gpt_logits, ParallelLayout(1, 1), paths, _input_ids())
    return {"tp1": legacy, "dist": torch_dist}


def _assert_matches(logits, reference):
    assert isinstance(logits, torch.Tensor), logits  # else: the error text of the load
    assert logits.shape == reference.shape
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def test_megatron_gpt_model_matches_hf(megatron_tp1, reference_logits):
    """megatron-core's GPTModel loading the TP=1 legacy files strictly computes the HF logits."""
    _assert_matches(megatron_tp1["tp1"], reference_logits)


@pytest.mark.slow
def test_megatron_gpt_model_matches_hf_at_tp2_pp2(megatron, reference_logits):
    """The same on the TP=2 PP=2 files: proves the legacy per-rank layouts (QKV groups per rank,
    [gate_r; up_r], vocab rows, stage-local layer numbers) are the ones Megatron-Core expects."""
    pytest.importorskip("megatron.core", reason="megatron-core is needed for the Megatron side")
    from modeling.megatron.builder import ParallelLayout
    from modeling.megatron.distributed import run_ranks

    (logits,) = run_ranks(megatron_gpt_logits, ParallelLayout(2, 2), [str(megatron["tp2-pp2"])], _input_ids())
    _assert_matches(logits, reference_logits)


def test_megatron_core_loads_the_converters_torch_dist(megatron_tp1, reference_logits):
    _assert_matches(megatron_tp1["dist"], reference_logits)
