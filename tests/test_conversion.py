"""The conversion engine end to end: Megatron (legacy / torch_dist, TP/PP, local / TE names) <-> HF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TOKENIZER, cli, load_hf_tensors, reference_file, remote_code_logits, tiny_inputs

pytest.importorskip("megatron.core", reason="the Megatron side is needed to make checkpoints")

from modeling import NVLM_D_Model  # noqa: E402
from modeling.megatron.builder import ParallelLayout  # noqa: E402
from modeling.megatron.distributed import run_ranks  # noqa: E402
from modeling.megatron.session import ForwardJob, ModelSource, forward_rank  # noqa: E402


def megatron_outputs(checkpoint, layout, cases):
    """Megatron's outputs for `cases`, from a checkpoint, at its layout."""
    job = ForwardJob(ModelSource(checkpoint=str(checkpoint)), layout, cases)
    return run_ranks(forward_rank, layout, job)["outputs"]


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """Each seeded checkpoint converted to a Hugging Face folder."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, path in checkpoints.items():
        code, output = cli("megatron-to-hf", path, root / name, "--tokenizer", TINY_TOKENIZER)
        assert code == 0, output
        out[name] = root / name
    return out


def test_every_source_layout_gives_the_same_hf_weights(converted):
    """One seed, three layouts (TP2/PP2 local legacy, TP1 TE-named legacy, TP2 torch_dist): the
    converted tensors are bit-identical."""
    reference = load_hf_tensors(converted["tp2-pp2"])
    assert len(reference) == len(NVLM_D_Model(_tiny_config()).state_dict())
    for name in ("tp1-te", "tp2-dist"):
        other = load_hf_tensors(converted[name])
        assert other.keys() == reference.keys()
        for key in reference:
            assert torch.equal(other[key], reference[key]), (name, key)


def _tiny_config():
    from modeling import get_config

    return get_config("tiny")


def test_folder_contents(converted):
    folder = converted["tp2-pp2"]
    for name in (
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_nvlm_d.py",
        "modeling_nvlm_d.py",
        "modeling_intern_vit.py",
        "processing_nvlm_d.py",
        "model.safetensors",
        "README.md",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_nvlm_d.NVLM_D_Model"
    assert config["img_context_token_id"] == 989  # from the tokenizer's <|vision_pad|>
    assert config["projector_layer_norm_eps"] == 1e-5  # recorded from the checkpoint's args
    assert config["vision_config"]["num_dummy_heads"] == 7  # always real + 7, whatever Megatron padded
    assert config["architectures"] == ["NVLM_D"]  # the release's; vLLM selects its model by it
    assert config["torch_dtype"] == config["dtype"] == "float32"  # the source's (transformers 4 and 5 names)
    # the tokenizer's <|im_end|>, <|endoftext|> (bos, as the release records) and pad: generate() stops
    special = {"eos_token_id": 980, "bos_token_id": 978, "pad_token_id": 978}
    assert {k: config["llm_config"][k] for k in special} == special
    generation = json.loads((folder / "generation_config.json").read_text())
    assert {k: generation[k] for k in special} == special
    assert not list(folder.parent.glob(".*partial*"))


def test_model_card(converted):
    """README.md with the Hub's front matter and the provenance the manifest holds."""
    folder = converted["tp2-dist"]
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-text-to-text", "- custom_code"):
        assert line in front.splitlines(), front
    manifest = json.loads((folder / "nvlm_port_manifest.json").read_text())
    assert manifest["files"]["README.md"]["size"] == len(card.encode())  # sealed with the rest
    assert f"`{manifest['files']['model.safetensors']['sha256']}`" in card
    assert "Megatron-LM `torch_dist`, iter_0000001" in card and "TP=2 PP=1" in card
    assert "trust_remote_code=True" in card


def test_save_pretrained_keeps_the_release_architecture(converted, tmp_path):
    from modeling import NVLM_D_Model

    model = NVLM_D_Model.from_pretrained(converted["tp2-pp2"])
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["NVLM_D"]


def test_megatron_and_hf_logits_agree(checkpoints, converted, tiny_tokenizer):
    """Megatron at TP=2/PP=2 from its checkpoint vs our class from the converted folder, float32."""
    cases = tiny_inputs(tiny_tokenizer)
    layout = ParallelLayout(2, 2)
    megatron = megatron_outputs(checkpoints["tp2-pp2"], layout, cases)
    model = NVLM_D_Model.from_pretrained(converted["tp2-pp2"]).eval()
    for case, ref in zip(cases, megatron):
        with torch.no_grad():
            logits = model(pixel_values=case["pixel_values"], input_ids=case["input_ids"]).logits
        logits = logits[..., : ref.logits.shape[-1]]  # compare over the true vocab
        assert (logits - ref.logits).abs().max() < 1e-5
        assert logits.argmax(-1).equal(ref.logits.argmax(-1))


def test_converted_folder_loads_as_remote_code_without_nvlm_port(converted, tiny_tokenizer, tmp_path):
    """AutoModel(..., trust_remote_code=True) in a Python without nvlm-port: same logits as our class."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(converted["tp2-pp2"], folder)
    case = tiny_inputs(tiny_tokenizer)[1]
    remote = remote_code_logits(folder, case["pixel_values"], case["input_ids"], tmp_path)
    with torch.no_grad():
        ours = (
            NVLM_D_Model.from_pretrained(folder)
            .eval()(pixel_values=case["pixel_values"], input_ids=case["input_ids"])
            .logits
        )
    assert torch.equal(remote, ours)


ROUND_TRIPS = [
    (1, 1, "torch"),
    (2, 1, "torch"),
    (4, 1, "torch"),
    (1, 2, "torch"),
    (2, 2, "torch"),
    (1, 1, "torch_dist"),
    (2, 2, "torch_dist"),
    (4, 1, "torch_dist"),
]


@pytest.mark.parametrize("tp,pp,fmt", ROUND_TRIPS)
def test_hf_megatron_hf_round_trip_is_bit_exact(converted, tmp_path, tp, pp, fmt):
    source = converted["tp2-pp2"]
    code, output = cli("hf-to-megatron", source, tmp_path / "m", "--tp", tp, "--pp", pp, "--format", fmt)
    assert code == 0, output
    code, output = cli("megatron-to-hf", tmp_path / "m", tmp_path / "h", "--no-tokenizer")
    assert code == 0, output
    before, after = load_hf_tensors(source), load_hf_tensors(tmp_path / "h")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key


def test_reshard_then_convert(checkpoints, converted, tmp_path):
    code, output = cli("reshard", checkpoints["tp2-pp2"], tmp_path / "tp4", "--tp", 4, "--pp", 1)
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "tp4" / "iter_0000001").iterdir()) == [
        f"mp_rank_{t:02d}" for t in range(4)
    ]
    code, output = cli("megatron-to-hf", tmp_path / "tp4", tmp_path / "h", "--no-tokenizer")
    assert code == 0, output
    before, after = load_hf_tensors(converted["tp2-pp2"]), load_hf_tensors(tmp_path / "h")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_converted_back_checkpoint_runs_to_the_same_megatron_logits(
    checkpoints, converted, tmp_path, tiny_tokenizer
):
    code, output = cli("hf-to-megatron", converted["tp2-pp2"], tmp_path / "back", "--tp", 2, "--pp", 2)
    assert code == 0, output
    cases = tiny_inputs(tiny_tokenizer)
    layout = ParallelLayout(2, 2)
    runs = [megatron_outputs(path, layout, cases) for path in (checkpoints["tp2-pp2"], tmp_path / "back")]
    for original, back in zip(*runs):
        assert torch.equal(original.logits, back.logits)


def test_dry_run_of_the_72b_reproduces_the_release_index(shapes_only_72b, tmp_path):
    index = json.loads(reference_file("model.safetensors.index.json").read_text())
    rows = [line.split("\t") for line in reference_file("tensors.tsv").read_text().splitlines()[1:]]
    release = {
        r[0]: ([int(x) for x in r[1].split(",")], {"BF16": "bfloat16", "F32": "float32"}[r[2]]) for r in rows
    }
    plan_file = tmp_path / "plan.json"
    code, output = cli(
        "megatron-to-hf", shapes_only_72b, "--dry-run", "--dtype", "official", "--plan-json", plan_file
    )
    assert code == 0, output
    plan = json.loads(plan_file.read_text())
    assert len(plan["tensors"]) == 1556 and set(plan["tensors"]) == set(release)
    for name, entry in plan["tensors"].items():
        assert (entry["shape"], entry["dtype"]) == release[name], name
    assert plan["total_size"] == index["metadata"]["total_size"] == 176_901_927_168
    assert len({entry["shard"] for entry in plan["tensors"].values()}) == 46


def test_inspect(checkpoints):
    code, output = cli("inspect", checkpoints["tp2-dist"])
    assert code == 0, output
    assert "torch_dist" in output and "TP=2 PP=1" in output and "tensors" in output


def test_unknown_tensor_is_refused(checkpoints, tmp_path):
    import shutil

    from converter.formats import safe_pickle

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["tp1-te"], broken)
    path = broken / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = safe_pickle.load(path, mmap=False)
    state["model"]["language_model.decoder.layers.0.mystery.weight"] = torch.zeros(3)
    torch.save(state, path)
    code, output = cli("megatron-to-hf", broken, tmp_path / "out", "--no-tokenizer")
    assert code == 2 and "mystery" in output and "no mapping row" in output
    assert not (tmp_path / "out").exists()


def test_virtual_pipeline_chunks_are_joined(converted, tmp_path):
    """A legacy checkpoint with virtual pipeline chunks (model0, model1): PP=1, VP=2, one layer per
    chunk, layer numbers restarting at 0 in each chunk. Built from a PP=2 checkpoint's stages."""
    from converter.formats import legacy, safe_pickle

    code, output = cli("hf-to-megatron", converted["tp2-pp2"], tmp_path / "pp2", "--tp", 1, "--pp", 2)
    assert code == 0, output
    stages = [
        safe_pickle.load(legacy.rank_dir(tmp_path / "pp2", 1, 0, p, 2) / "model_optim_rng.pt", mmap=False)
        for p in range(2)
    ]
    args = stages[0]["args"]
    args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size = 1, 2
    path = legacy.rank_dir(tmp_path / "vp", 1, 0, 0, 1)
    path.mkdir(parents=True)
    torch.save(
        {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": 1,
            "model0": stages[0]["model"],
            "model1": stages[1]["model"],
        },
        path / "model_optim_rng.pt",
    )
    legacy.write_tracker(tmp_path / "vp", 1)
    code, output = cli("megatron-to-hf", tmp_path / "vp", tmp_path / "h", "--no-tokenizer")
    assert code == 0, output
    before, after = load_hf_tensors(converted["tp2-pp2"]), load_hf_tensors(tmp_path / "h")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_converted_torch_dist_loads_into_megatron_core(checkpoints, converted, tmp_path, tiny_tokenizer):
    """hf-to-megatron --format torch_dist is read by Megatron-Core's own dist_checkpointing.load and
    runs to the logits of the Megatron-saved torch_dist checkpoint of the same weights."""
    code, output = cli(
        "hf-to-megatron", converted["tp2-pp2"], tmp_path / "dist", "--tp", 2, "--format", "torch_dist"
    )
    assert code == 0, output
    cases = tiny_inputs(tiny_tokenizer)
    layout = ParallelLayout(2, 1)
    runs = [megatron_outputs(path, layout, cases) for path in (checkpoints["tp2-dist"], tmp_path / "dist")]
    for original, ours in zip(*runs):
        assert torch.equal(original.logits, ours.logits)
