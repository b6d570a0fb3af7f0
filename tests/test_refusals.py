"""What the converter refuses, and how: one line naming the file and the problem, exit status 2,
no output folder left behind, and no code from a pickle ever executed (issue 7, items 1 and 2)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import TINY_TOKENIZER, cli

pytest.importorskip("megatron.core", reason="the checkpoints are made by the Megatron side")


class _CreatesAFile:
    """Unpickling this runs os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refused(tmp_path, source, *needles, options=("--no-tokenizer",)):
    out = tmp_path / "out"
    code, output = cli("megatron-to-hf", source, out, *options)
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
    return output


def _copy(checkpoints, name, tmp_path):
    source = tmp_path / name
    shutil.copytree(checkpoints[name], source)
    return source


def _edit(path, change):
    """Load a rank file, let `change` edit the dict, save it back (as Megatron would have)."""
    import torch

    from converter.formats import safe_pickle

    state = safe_pickle.load(path, mmap=False)
    change(state)
    torch.save(state, path)


def _rank(source, tp_rank=0, pp_rank=None):
    suffix = "" if pp_rank is None else f"_{pp_rank:03d}"
    return source / "iter_0000001" / f"mp_rank_{tp_rank:02d}{suffix}" / "model_optim_rng.pt"


def test_a_pickle_that_runs_code_is_refused(checkpoints, tmp_path):
    import torch

    source = tmp_path / "hostile"
    shutil.copytree(checkpoints["tp1-te"], source)
    marker = tmp_path / "pwned"
    rank = source / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"args": _CreatesAFile(marker), "model": {}}, rank)
    output = _refused(tmp_path, source, str(rank), "posix.system")
    assert "--trust-pickle" in output
    assert not marker.exists()


def test_not_a_checkpoint_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", "not a Megatron checkpoint")
    _refused(tmp_path, tmp_path / "missing", "does not exist")


def test_tracker_pointing_to_a_missing_iteration(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp1-te"], source)
    (source / "latest_checkpointed_iteration.txt").write_text("7")
    _refused(tmp_path, source, "latest_checkpointed_iteration.txt", "iteration 7")


def test_missing_tp_rank(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp2-pp2"], source)
    shutil.rmtree(source / "iter_0000001" / "mp_rank_01_001")
    _refused(tmp_path, source, "mp_rank_01_001", "missing")


def test_truncated_rank_file(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp1-te"], source)
    rank = source / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    rank.write_bytes(rank.read_bytes()[: rank.stat().st_size // 2])
    _refused(tmp_path, source, str(rank), "cannot be read")


def test_unknown_sharded_backend(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp2-dist"], source)
    meta = source / "iter_0000001" / "metadata.json"
    meta.write_text(json.dumps({"sharded_backend": "zarr"}))
    _refused(tmp_path, source, "metadata.json", "zarr")


def test_existing_output_is_not_overwritten_without_asking(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer")
    assert code == 2 and "--overwrite" in output
    assert (out / "keep.txt").read_text() == "mine"


def test_several_iterations_and_no_tracker(checkpoints, tmp_path):
    """The newest iteration is read and the choice said on stderr; --iteration picks another."""
    from conftest import load_hf_tensors

    source = _copy(checkpoints, "tp1-te", tmp_path)
    shutil.copytree(source / "iter_0000001", source / "iter_0000002")
    norm = "language_model.decoder.final_layernorm.weight"
    _edit(source / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", lambda s: s["model"][norm].add_(1))
    (source / "latest_checkpointed_iteration.txt").unlink()
    code, output = cli("megatron-to-hf", source, tmp_path / "newest", "--no-tokenizer")
    assert code == 0, output
    assert (
        "no latest_checkpointed_iteration.txt" in output and "newest of 2 iterations, iter_0000002" in output
    )
    code, output = cli("megatron-to-hf", source, tmp_path / "first", "--no-tokenizer", "--iteration", 1)
    assert code == 0 and "newest" not in output, output
    newest, first = (
        load_hf_tensors(tmp_path / n)["language_model.model.norm.weight"] for n in ("newest", "first")
    )
    assert newest.equal(first + 1)


@pytest.mark.parametrize("kind", ["args", "tensors", "extra-rank", "chunks"])
def test_ranks_with_different_layouts(checkpoints, tmp_path, kind):
    source = _copy(checkpoints, "tp2-pp2", tmp_path)
    rank = _rank(source, 1, 0)
    if kind == "args":
        _edit(rank, lambda s: setattr(s["args"], "hidden_size", 256))
        _refused(tmp_path, source, str(rank), "args.hidden_size is 256", "different layouts")
    elif kind == "tensors":
        _edit(rank, lambda s: s["model"].pop("vision_model.conv1.bias"))
        _refused(tmp_path, source, str(rank), "different tensors", "vision_model.conv1.bias")
    elif kind == "extra-rank":
        shutil.copytree(rank.parent, source / "iter_0000001" / "mp_rank_02_000")
        _refused(tmp_path, source, "mp_rank_02_000", "TP=2 PP=2")
    else:
        _edit(rank, lambda s: s.update(model0=s.pop("model"), model1={}))
        _refused(tmp_path, source, str(rank), "model chunks")


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "missing"])
def test_broken_distcp_file(checkpoints, tmp_path, damage):
    source = _copy(checkpoints, "tp2-dist", tmp_path)
    data = source / "iter_0000001" / "__1_0.distcp"
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[:1000])
        _refused(tmp_path, source, str(data), "truncated")
    elif damage == "corrupted":  # the first chunk's own header: what a flipped sector does
        raw = bytearray(data.read_bytes())
        raw[:64] = bytes(range(64))
        data.write_bytes(bytes(raw))
        _refused(tmp_path, source, str(data), "cannot read")
    else:
        data.unlink()
        _refused(tmp_path, source, str(data), "missing")


def test_shapes_that_disagree_between_ranks(checkpoints, tmp_path):
    source = _copy(checkpoints, "tp2-pp2", tmp_path)
    rank, name = _rank(source, 1, 0), "language_model.decoder.layers.0.self_attention.linear_proj.weight"
    _edit(rank, lambda s: s["model"].update({name: s["model"][name][:, :-1].clone()}))
    _refused(tmp_path, source, str(rank), name, "different shapes")


def test_replicated_tensor_that_differs_between_ranks(checkpoints, tmp_path):
    source = _copy(checkpoints, "tp2-pp2", tmp_path)
    rank, name = _rank(source, 1, 1), "language_model.decoder.final_layernorm.weight"
    _edit(rank, lambda s: s["model"][name].add_(1e-3))
    _refused(tmp_path, source, str(rank), name, "differs between TP rank 0 and TP rank 1")


@pytest.mark.parametrize("module", ["linear_qkv", "linear_proj"])
def test_non_zero_dummy_vit_head(checkpoints, tmp_path, module):
    """Tiny ViT: 5 real heads of 16 channels, padded to 6 at TP=2; TP rank 1 holds heads 3-5, and
    head 5 (its last qkv rows / last proj columns) must be exactly zero."""
    source = _copy(checkpoints, "tp2-pp2", tmp_path)
    name = f"vision_model.decoder.layers.1.self_attention.{module}.weight"

    def poison(state):
        if module == "linear_qkv":
            state["model"][name][-1, 0] = 0.5  # a row of head 5
        else:
            state["model"][name][0, -1] = 0.5  # a column of head 5

    _edit(_rank(source, 1, 0), poison)
    _refused(tmp_path, source, name, "dummy head", "not zero")


@pytest.mark.parametrize("kind", ["unknown", "missing", "both-spellings"])
def test_tensor_names(checkpoints, tmp_path, kind):
    import torch

    source = _copy(checkpoints, "tp1-te", tmp_path)
    rank = _rank(source)
    if kind == "unknown":
        _edit(rank, lambda s: s["model"].update({"vision_model.mystery.weight": torch.ones(3)}))
        _refused(tmp_path, source, "no mapping row knows", "vision_model.mystery.weight")
    elif kind == "missing":
        _edit(rank, lambda s: s["model"].pop("language_model.decoder.final_layernorm.weight"))
        _refused(tmp_path, source, "lacks tensors the model needs", "language_model.model.norm.weight")
    else:  # the TE-fused norm and the local spelling of the same tensor, both present
        te = "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
        local = "language_model.decoder.layers.0.input_layernorm.weight"
        _edit(rank, lambda s: s["model"].update({local: s["model"][te].clone()}))
        _refused(tmp_path, source, "written twice", local)


@pytest.mark.parametrize("kind", ["shape", "absent"])
def test_args_that_contradict_the_tensors(checkpoints, tmp_path, kind):
    source = _copy(checkpoints, "tp1-te", tmp_path)
    if kind == "shape":
        _edit(_rank(source), lambda s: setattr(s["args"], "ffn_hidden_size", 2 * s["args"].ffn_hidden_size))
        _refused(tmp_path, source, "args.ffn_hidden_size is 512, but the tensors give 256")
    else:
        _edit(_rank(source), lambda s: delattr(s["args"], "hidden_size"))
        _refused(tmp_path, source, "iter_0000001", "args do not describe", "hidden_size")


@pytest.mark.parametrize("kind", ["missing", "not-a-tokenizer", "broken"])
def test_missing_or_invalid_tokenizer(checkpoints, tmp_path, kind):
    tokenizer = tmp_path / "tokenizer"
    if kind == "not-a-tokenizer":
        tokenizer.mkdir()
        (tokenizer / "tokenizer_config.json").write_text("{}")
        needle = "not a tokenizer folder"
    elif kind == "broken":
        shutil.copytree(TINY_TOKENIZER, tokenizer)
        (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": ')
        needle = "does not load"
    else:
        needle = "does not exist"
    _refused(tmp_path, checkpoints["tp1-te"], str(tokenizer), needle, options=("--tokenizer", tokenizer))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_with_check_finite(checkpoints, tmp_path, value):
    source = _copy(checkpoints, "tp2-pp2", tmp_path)
    rank, name = _rank(source, 1, 0), "language_model.decoder.layers.0.mlp.linear_fc2.weight"
    _edit(rank, lambda s: s["model"][name].view(-1)[7].fill_(value))
    _refused(tmp_path, source, name, "NaN or Inf", options=("--no-tokenizer", "--check-finite"))
    code, output = cli("megatron-to-hf", source, tmp_path / "unchecked", "--no-tokenizer")
    assert code == 0, output  # without the flag the values are carried as they are


@pytest.mark.parametrize("where", ["under-a-file", "read-only-parent"])
def test_unwritable_output_location(checkpoints, tmp_path, where):
    if where == "under-a-file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        out = blocker / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits; the under-a-file case covers root")
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o500)
        out = parent / "out"
    try:
        code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer")
    finally:
        if where == "read-only-parent":
            parent.chmod(0o700)
    assert code == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot write there" in errors[0] and str(out.parent) in errors[0]
    assert not out.exists() and not list(out.parent.parent.glob(f"**/.{out.name}.partial*"))


# -- issue 15: the rest of the list (one line, exit 2, nothing left, no code run) ------------------


def _one_line(code, output, *needles):
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


@pytest.mark.parametrize("kind", ["not-utf8", "folder"])
def test_a_tracker_that_is_not_text(checkpoints, tmp_path, kind):
    source = _copy(checkpoints, "tp1-te", tmp_path)
    tracker = source / "latest_checkpointed_iteration.txt"
    if kind == "not-utf8":
        tracker.write_bytes(b"\xff\xfe1")
        _refused(tmp_path, source, str(tracker), "not text")
    else:
        tracker.unlink()
        tracker.mkdir()
        _refused(tmp_path, source, str(tracker), "is a folder")


def test_metadata_json_that_is_not_an_object(checkpoints, tmp_path):
    source = _copy(checkpoints, "tp2-dist", tmp_path)
    (source / "iter_0000001" / "metadata.json").write_text("[1, 2]")
    _refused(tmp_path, source, "metadata.json", "not a JSON object")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tensor_model_parallel_size", 2**20),
        ("pipeline_model_parallel_size", 2**20),
        ("num_layers", 2**20),
        ("tensor_model_parallel_size", 0),
        ("pipeline_model_parallel_size", -1),
        ("hidden_size", 0),
        ("ffn_hidden_size", -1),
        ("num_attention_heads", 0),
    ],
)
def test_args_sizes_that_are_huge_zero_or_negative(checkpoints, tmp_path, field, value):
    """Refused from the rank files present and the tensors, before anything proportional is built."""
    import time

    source = _copy(checkpoints, "tp1-te", tmp_path)
    _edit(_rank(source), lambda s: setattr(s["args"], field, value))
    started = time.perf_counter()
    _refused(tmp_path, source, "iter_0000001")
    assert time.perf_counter() - started < 30


def test_dcp_metadata_claiming_10_to_the_12_stacked_layers(checkpoints, tmp_path):
    import pickle
    import time

    import torch

    from converter.formats import safe_pickle

    source = _copy(checkpoints, "tp2-dist", tmp_path)
    meta_path = source / "iter_0000001" / ".metadata"
    metadata = safe_pickle.load_dcp_metadata(meta_path)
    key = next(k for k in metadata.state_dict_metadata if k.endswith("decoder.layers.mlp.linear_fc1.weight"))
    meta = metadata.state_dict_metadata[key]
    meta.size = torch.Size([10**12, *meta.size[1:]])
    meta_path.write_bytes(pickle.dumps(metadata))
    started = time.perf_counter()
    _refused(tmp_path, source, str(meta_path), key, "chunks hold")
    assert time.perf_counter() - started < 30


@pytest.fixture(scope="module")
def hf_tiny(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-refusals") / "hf"
    code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    return out


def _hf_refused(tmp_path, source, *needles, options=()):
    out = tmp_path / "mega"
    code, output = cli("hf-to-megatron", source, out, *options)
    line = _one_line(code, output, *needles)
    assert not out.exists() and not list(tmp_path.glob(".mega.partial*"))
    return line


def _hf_copy(hf_tiny, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(hf_tiny, folder)
    return folder


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["not-json", "a-list", "negative", "zero", "zero-layers"])
def test_config_json_that_is_broken_or_has_bad_sizes(hf_tiny, tmp_path, kind):
    folder = _hf_copy(hf_tiny, tmp_path)
    config = folder / "config.json"
    if kind == "not-json":
        config.write_text("{not json")
        _hf_refused(tmp_path, folder, str(config), "not JSON")
    elif kind == "a-list":
        config.write_text("[1, 2]")
        _hf_refused(tmp_path, folder, str(config), "not a JSON object")
    else:
        key, value = {"negative": ("hidden_size", -128), "zero": ("hidden_size", 0)}.get(
            kind, ("num_hidden_layers", 0)
        )
        _edit_config(folder, lambda c: c["llm_config"].update({key: value}))
        _hf_refused(tmp_path, folder, str(config))


def test_a_tensor_whose_shape_contradicts_config_json(hf_tiny, tmp_path):
    folder = _hf_copy(hf_tiny, tmp_path)
    _edit_config(
        folder, lambda c: c["llm_config"].update(intermediate_size=2 * c["llm_config"]["intermediate_size"])
    )
    _hf_refused(
        tmp_path, folder, "model.safetensors", "mlp.gate_proj.weight has the shape", "config.json implies"
    )


def test_a_tensor_in_two_shard_files(hf_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _hf_copy(hf_tiny, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "language_model.model.norm.weight"
    save_file({name: tensors[name] + 1}, str(folder / "zz-extra.safetensors"))
    _hf_refused(tmp_path, folder, "zz-extra.safetensors", name, "two shard files")


@pytest.mark.parametrize("dtype", ["F8_E4M3", "U16"])
def test_an_unknown_safetensors_dtype(hf_tiny, tmp_path, dtype):
    folder = _hf_copy(hf_tiny, tmp_path)
    shard = folder / "model.safetensors"
    raw = shard.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = dtype  # the same bytes, read as a 1- or 2-byte type
    header[name]["shape"][-1] *= {"F8_E4M3": 4, "U16": 2}[dtype]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    _hf_refused(tmp_path, folder, str(shard), name, f"the dtype {dtype}")


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (("--tp", "3"), "cannot be split at TP=3"),
        (("--pp", "3"), "do not divide into PP=3"),
        (("--tp", "0"), "'--tp'"),
        (("--pp", "0"), "'--pp'"),
    ],
)
def test_hf_to_megatron_layouts_that_cannot_be(hf_tiny, tmp_path, options, needle):
    _hf_refused(tmp_path, hf_tiny, needle, options=options)


@pytest.mark.parametrize("size", ["4XB", "inf GB", "0"])
def test_a_max_shard_size_that_is_no_size(checkpoints, tmp_path, size):
    out = tmp_path / "out"
    code, output = cli(
        "megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer", "--max-shard-size", size
    )
    _one_line(code, output, "--max-shard-size")
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_a_full_disk_in_hf_to_megatron(hf_tiny, tmp_path, fmt):
    import subprocess
    import sys

    from conftest import REPO

    script = (
        "import resource, signal, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from converter.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "mega"
    run = subprocess.run(
        [sys.executable, "-c", script, "hf-to-megatron", str(hf_tiny), str(out), "--format", fmt],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line(run.returncode, run.stderr, str(out), "writing failed", "partial output removed")
    assert list(tmp_path.iterdir()) == []


# -- parity-check: the same checks before megatron-core sees the checkpoint -----------------------


def _parity(*args):
    from click.testing import CliRunner

    from converter.parity_cli import main

    result = CliRunner().invoke(main, ["logits", *[str(a) for a in args]], catch_exceptions=False)
    return result.exit_code, result.output


def _hostile_byte_object(source, marker):
    """Point one `_extra_state` byte object of a torch_dist checkpoint at a pickle that runs code
    (megatron-core's loader torch.loads byte objects with weights_only=False)."""
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from converter.formats import safe_pickle

    iteration = source / "iter_0000001"
    metadata = safe_pickle.load_dcp_metadata(iteration / ".metadata")
    index = next(i for i in metadata.storage_data if i.fqn.endswith("._extra_state/shard_0_2"))
    payload = iteration / "__9_0.distcp"
    torch.save(_CreatesAFile(marker), payload)
    metadata.storage_data[index] = _StorageInfo(payload.name, 0, payload.stat().st_size)
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))
    return payload


@pytest.mark.parametrize("where", ["rank-file", "metadata", "byte-object"])
def test_parity_check_runs_no_code_from_the_checkpoint(checkpoints, hf_tiny, tmp_path, where):
    import pickle

    import torch

    marker = tmp_path / "pwned"
    if where == "rank-file":
        source = _copy(checkpoints, "tp1-te", tmp_path)
        torch.save({"args": _CreatesAFile(marker), "model": {}}, _rank(source))
        needles = (str(_rank(source)), "posix.system")
    elif where == "metadata":
        source = _copy(checkpoints, "tp2-dist", tmp_path)
        (source / "iter_0000001" / ".metadata").write_bytes(pickle.dumps(_CreatesAFile(marker)))
        needles = (".metadata", "posix.system")
    else:
        source = _copy(checkpoints, "tp2-dist", tmp_path)
        needles = (str(_hostile_byte_object(source, marker)), "_extra_state", "posix.system")
    code, output = _parity("--megatron", source, "--hf", hf_tiny, "--report", tmp_path / "report")
    _one_line(code, output, *needles)
    assert "--trust-pickle" in output
    assert not marker.exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("kind", ["not-a-checkpoint", "hf-without-tokenizer", "not-an-hf-folder"])
def test_parity_check_on_the_wrong_folders(checkpoints, hf_tiny, tmp_path, kind):
    megatron, hf = checkpoints["tp1-te"], hf_tiny
    if kind == "not-a-checkpoint":
        megatron = tmp_path / "empty"
        megatron.mkdir()
        needle = "not a Megatron checkpoint"
    elif kind == "hf-without-tokenizer":
        hf = _hf_copy(hf_tiny, tmp_path)
        for name in ("tokenizer_config.json", "tokenizer.json"):
            (hf / name).unlink()
        needle = "no tokenizer"
    else:
        hf = tmp_path / "empty"
        hf.mkdir()
        needle = "no config.json"
    code, output = _parity("--megatron", megatron, "--hf", hf, "--report", tmp_path / "report")
    _one_line(code, output, needle)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("claim", ["2**31 layers", "fewer layers"])
def test_config_json_layer_counts_are_checked_against_the_tensors(hf_tiny, tmp_path, claim):
    import time

    folder = _hf_copy(hf_tiny, tmp_path)
    if claim == "2**31 layers":
        _edit_config(folder, lambda c: c["llm_config"].update(num_hidden_layers=2**31))
        needles = ("llm_config.num_hidden_layers is 2,147,483,648", "at most 2 layers")
    else:  # the tensors of the last ViT layer would be dropped silently
        _edit_config(folder, lambda c: c["vision_config"].update(num_hidden_layers=1))
        needles = ("vision_model.encoder.layers.1.", "config.json does not describe")
    started = time.perf_counter()
    _hf_refused(tmp_path, folder, *needles)
    assert time.perf_counter() - started < 30


def test_reshard_to_a_tp_that_does_not_divide_names_the_source(checkpoints, tmp_path):
    out = tmp_path / "out"
    code, output = cli("reshard", checkpoints["tp2-pp2"], out, "--tp", "3")
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith(f"error: {checkpoints['tp2-pp2']}: cannot reshard to TP=3 PP=1: "), output
    assert ".reshard-" not in errors[0] and not out.exists()
