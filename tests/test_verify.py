"""`convert-checkpoint verify` and the manifest a conversion writes (issue 7, item 5): a fresh
folder passes, and each kind of damage is found and named (exit 1); unreadable input exits 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_TOKENIZER, cli, make_megatron_checkpoint
from safetensors.torch import load_file, save_file

pytest.importorskip("megatron.core", reason="the checkpoints are made by the Megatron side")

from converter.manifest import MANIFEST  # noqa: E402


@pytest.fixture(scope="module")
def folder(checkpoints, tmp_path_factory):
    """The TP2/PP2 checkpoint in the release's dtypes (config.json says bfloat16), in 8 shards."""
    out = tmp_path_factory.mktemp("verify") / "hf"
    code, output = cli(
        "megatron-to-hf",
        checkpoints["tp2-pp2"],
        out,
        "--tokenizer",
        TINY_TOKENIZER,
        "--dtype",
        "official",
        "--max-shard-size",
        "250KB",
    )
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed7") / "tp1"
    return make_megatron_checkpoint(out, "--preset", "tiny", "--seed", "7")


@pytest.fixture
def copy(folder, tmp_path):
    target = tmp_path / "hf"
    shutil.copytree(folder, target)
    return target


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _problems(path, *options):
    code, output = cli("verify", path, *options)
    assert code == 1, output
    assert "Traceback" not in output
    return output


def test_the_manifest_lists_every_file_and_the_source(folder, checkpoints):
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    weight_map = _index(folder)["weight_map"]
    assert len(weight_map) == 61 and {*weight_map.values()} == {p.name for p in folder.glob("model-*")}
    assert len({*weight_map.values()}) > 3
    for name, entry in manifest["files"].items():
        assert entry["size"] == (folder / name).stat().st_size
    source = manifest["source"]
    assert source["path"] == str(checkpoints["tp2-pp2"].resolve())
    assert (source["format"], source["iteration"], source["dtype"]) == ("torch", "iter_0000001", "official")
    assert (source["tensor_parallel"], source["pipeline_parallel"]) == (2, 2)
    assert manifest["tool"]["name"] == "nvlm-port" and manifest["tool"]["version"]
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no resume records left


def test_a_fresh_folder_verifies_alone_and_against_its_source(folder, checkpoints):
    code, output = cli("verify", folder)
    listed = len(json.loads((folder / MANIFEST).read_text())["files"])
    assert code == 0 and "OK" in output and f"{listed} files match the manifest" in output, output
    # the same weights in another layout and format, cast to the stored bf16/fp32 on the way
    code, output = cli("verify", folder, "--against", checkpoints["tp2-dist"])
    assert code == 0 and "61 tensors bitwise equal" in output, output


def test_an_edited_byte_is_a_hash_mismatch(copy):
    shard = sorted(copy.glob("model-*.safetensors"))[3]
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x40
    shard.write_bytes(bytes(raw))
    output = _problems(copy)
    assert f"{shard.name}: sha256 differs from the manifest" in output
    assert "1 problem(s)" in output


def test_a_tensor_removed_from_the_index(copy):
    index = _index(copy)
    removed = "language_model.model.layers.1.mlp.up_proj.weight"
    del index["weight_map"][removed]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    output = _problems(copy)
    assert f"tensors in the files that the index does not list: {removed}" in output
    assert "model.safetensors.index.json: 5," in output and "the manifest says" in output


def test_a_tensor_stored_in_the_wrong_dtype(copy):
    name = "language_model.model.layers.0.post_attention_layernorm.weight"
    shard = copy / _index(copy)["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, shard, metadata={"format": "pt"})
    output = _problems(copy)
    assert f"{name}: F16 in {shard.name}, config.json says bfloat16" in output
    assert f"{shard.name}: " in output and "the manifest says" in output  # its size changed too


def test_missing_and_truncated_files(copy):
    (copy / "tokenizer.json").unlink()
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])
    output = _problems(copy)
    assert "tokenizer.json: missing (the manifest lists it)" in output
    assert f"{shard.name}: not a valid safetensors file" in output
    assert "tensors config.json's model has but the files lack" in output


def test_against_a_differently_seeded_checkpoint(folder, other_seed):
    output = _problems(folder, "--against", other_seed)
    assert "tensors that differ from" in output and "language_model.model.embed_tokens.weight" in output


def test_a_folder_without_manifest_is_checked_without_hashes(copy):
    (copy / MANIFEST).unlink()
    code, output = cli("verify", copy)
    assert code == 0 and f"no {MANIFEST}" in output, output


def test_unreadable_input_exits_2(copy, tmp_path):
    for args, needle in [
        ((tmp_path / "absent",), "not a folder"),
        ((tmp_path,), "no config.json"),
        ((copy, "--against", tmp_path), "not a Megatron checkpoint"),
    ]:
        code, output = cli("verify", *args)
        assert code == 2 and needle in output and "Traceback" not in output, output
    (copy / "config.json").write_text("{")
    code, output = cli("verify", copy)
    assert code == 2 and "config.json: unreadable" in output, output
