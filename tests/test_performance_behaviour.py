"""Issue 8's behaviour, never its timings: conversion streams in memory that does not grow with the
checkpoint (both directions, both formats), rank files written a tensor at a time are what
torch.save writes, torch_dist chunks are laid out as Megatron-Core lays them out."""

from __future__ import annotations

import os
import sys
import threading
import zipfile
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, cli, load_hf_tensors

sys.path.insert(0, str(REPO / "scripts"))

from conversion_bench import synthetic  # noqa: E402

from converter.formats import mapped_pages  # noqa: E402
from converter.formats.torch_zip import StreamedTorchSave  # noqa: E402
from modeling import get_config  # noqa: E402

MiB = 2**20

# The tiny model made wide and deep enough that one tensor is small next to the whole checkpoint:
# 12 LLM layers of about 31 MB in bfloat16 (largest tensor: fc1, 16 MiB), about 390 MB in all.
MEDIUM = dict(llm_hidden_size=1024, llm_intermediate_size=4096, llm_num_hidden_layers=12)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _rss_growth(action) -> int:
    """Highest RSS of this process while `action` runs, minus RSS before it (polled every 2 ms)."""
    process, peak, done = psutil.Process(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.002)

    before = process.memory_info().rss
    thread = threading.Thread(target=poll)
    thread.start()
    try:
        action()
    finally:
        done.set()
        thread.join()
    return max(peak[0], process.memory_info().rss) - before


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """The medium model as a legacy and a torch_dist checkpoint at TP=2 (synthetic weights), and
    as a Hugging Face folder."""
    root = tmp_path_factory.mktemp("medium")
    config = get_config("tiny", **MEDIUM)
    for fmt in ("torch", "torch_dist"):
        synthetic.write_checkpoint(root / fmt, config, fmt, tp=2, tokenizer_vocab=1000)
    code, output = cli("megatron-to-hf", root / "torch", root / "hf", "--no-tokenizer")  # also warms up
    assert code == 0, output
    return root


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_megatron_to_hf_memory_does_not_grow_with_the_checkpoint(medium, tmp_path, fmt):
    source = medium / fmt
    out = tmp_path / "hf"
    growth = _rss_growth(
        lambda: cli("megatron-to-hf", source, out, "--no-tokenizer", "--max-shard-size", "64MB")
    )
    assert len(list(out.glob("*.safetensors"))) > 4
    size = _size(source)
    assert size > 350 * MiB
    # Streaming holds one global tensor and its TP shards (16 MiB each here); keeping the rank
    # files' pages resident, or building shards whole, costs the checkpoint's size.
    assert growth < 100 * MiB, f"RSS grew by {growth / MiB:.0f} MiB converting {size / MiB:.0f} MiB"
    assert load_hf_tensors(out).keys() == load_hf_tensors(medium / "hf").keys()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_hf_to_megatron_memory_does_not_grow_with_the_model(medium, tmp_path, fmt):
    out = tmp_path / "back"
    growth = _rss_growth(lambda: cli("hf-to-megatron", medium / "hf", out, "--tp", 2, "--format", fmt))
    size = _size(out)
    assert size > 350 * MiB
    # One global tensor and its pieces; a whole rank file (legacy), one parameter stacked over all
    # layers (torch_dist) or the HF files' pages kept resident would cost 190 MiB and more here.
    assert growth < 100 * MiB, f"RSS grew by {growth / MiB:.0f} MiB writing {size / MiB:.0f} MiB"


def test_torch_dist_chunks_are_megatron_cores(checkpoints, tmp_path):
    """hf-to-megatron --format torch_dist stores every tensor in the chunks Megatron-Core's own
    save makes (one per layer and TP rank; SwiGLU fc1 as gate and up chunks), so that reading one
    layer reads only that layer."""
    import torch.distributed.checkpoint as dcp

    code, output = cli("megatron-to-hf", checkpoints["tp2-dist"], tmp_path / "hf", "--no-tokenizer")
    assert code == 0, output
    code, output = cli(
        "hf-to-megatron", tmp_path / "hf", tmp_path / "ours", "--tp", 2, "--format", "torch_dist"
    )
    assert code == 0, output

    def chunks(root):
        metadata = dcp.FileSystemReader(str(Path(root) / "iter_0000001")).read_metadata()
        return {
            key: (tuple(meta.size), sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks))
            for key, meta in metadata.state_dict_metadata.items()
            if hasattr(meta, "chunks")
        }

    theirs, ours = chunks(checkpoints["tp2-dist"]), chunks(tmp_path / "ours")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key] == theirs[key], key


def test_streamed_rank_file_is_what_torch_save_writes(tmp_path):
    """A file written tensor by tensor equals torch.save's but for the random serialization id
    every save draws; both loaders read it; its zip CRCs are right."""
    import argparse

    tensors = {
        "a": torch.randn(1000, 3).to(torch.bfloat16),
        "b": torch.randn(7),
        "empty": torch.empty(0),
        "ints": torch.arange(10),
        "big": torch.randn(300, 1000),
    }

    def contents(model):
        return {"args": argparse.Namespace(x=1, dtype=torch.bfloat16), "iteration": 1, "model": model}

    (tmp_path / "streamed").mkdir()
    (tmp_path / "saved").mkdir()
    streamed = tmp_path / "streamed" / "model_optim_rng.pt"
    writer = StreamedTorchSave(
        streamed, contents({k: torch.empty(v.shape, dtype=v.dtype) for k, v in tensors.items()})
    )
    for index, tensor in enumerate(tensors.values()):
        writer.write(index, tensor)
    writer.finish()
    saved = tmp_path / "saved" / "model_optim_rng.pt"
    torch.save(contents(tensors), saved)

    with zipfile.ZipFile(streamed) as ours, zipfile.ZipFile(saved) as theirs:
        assert ours.testzip() is None
        assert [i.filename for i in ours.infolist()] == [i.filename for i in theirs.infolist()]
        differing = [i.filename for i in ours.infolist() if ours.read(i) != theirs.read(i.filename)]
        assert differing == ["model_optim_rng/.data/serialization_id"]
    torch.serialization.add_safe_globals([argparse.Namespace])
    for mmap in (False, True):
        back = torch.load(streamed, weights_only=True, mmap=mmap)["model"]
        assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_streamed_rank_file_refuses_an_unwritten_tensor(tmp_path):
    writer = StreamedTorchSave(tmp_path / "f.pt", {"a": torch.empty(3), "b": torch.empty(2)})
    writer.write(0, torch.ones(3))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.close()


def test_page_release_drops_mapped_pages_and_keeps_their_data(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"t": torch.arange(64 * MiB // 8, dtype=torch.int64)}, path)
    tensor = torch.load(path, mmap=True, weights_only=True)["t"]
    mappings = mapped_pages.FileMappings([path])
    process = psutil.Process()
    before = process.memory_info().rss
    total = int(tensor.sum())
    touched = process.memory_info().rss
    mappings.release([tensor])
    released = process.memory_info().rss
    assert touched - before > 48 * MiB and touched - released > 48 * MiB
    assert int(tensor.sum()) == total  # the pages come back from the file
    ordinary = torch.arange(1000)
    mappings.release([ordinary])  # ordinary memory is left alone (madvise would zero it)
    assert torch.equal(ordinary, torch.arange(1000))
    other = tmp_path / "other.pt"
    torch.save({"t": torch.arange(1000)}, other)
    elsewhere = torch.load(other, mmap=True, weights_only=True)["t"]
    assert mappings.file_range(elsewhere) is None  # another file's mapping is not this owner's
    assert mappings.file_range(tensor).path == str(path.resolve())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_workers_write_the_same_bytes_as_one_process(medium, tmp_path, fmt):
    """--workers 3: every shard written whole by one of three processes; the folder (shards, index,
    manifest, config, code) is byte for byte the single-process one."""
    options = ("--no-tokenizer", "--max-shard-size", "48MB")
    code, output = cli("megatron-to-hf", medium / fmt, tmp_path / "one", *options)
    assert code == 0, output
    code, output = cli("megatron-to-hf", medium / fmt, tmp_path / "three", *options, "--workers", 3)
    assert code == 0, output
    one = {p.relative_to(tmp_path / "one"): p for p in (tmp_path / "one").rglob("*") if p.is_file()}
    three = {p.relative_to(tmp_path / "three"): p for p in (tmp_path / "three").rglob("*") if p.is_file()}
    assert one.keys() == three.keys()
    assert len([p for p in one if p.suffix == ".safetensors"]) >= 6
    for name in one:
        assert one[name].read_bytes() == three[name].read_bytes(), name


def test_a_failing_worker_ends_the_conversion_with_one_line(tmp_path):
    """A NaN found by one worker (--check-finite): exit status 2, the file named, no output left."""

    class WithNaN(synthetic.SyntheticSource):
        def get(self, name):
            tensor = super().get(name)
            if name == "language_model.model.layers.1.mlp.down_proj.weight":
                tensor[0, 0] = float("nan")
            return tensor

    config = get_config("tiny", llm_num_hidden_layers=4)
    table = synthetic.NVLMD.table(config)
    source = WithNaN(config, table)
    args = synthetic.NVLMD.megatron_args(
        config, 2, 1, dtype=torch.bfloat16, divisible_by=128, tokenizer_vocab=1000
    )
    synthetic.write_legacy(tmp_path / "ckpt", args, synthetic.hf_steps(table, list(source.shapes)), source)
    out = tmp_path / "out"
    code, output = cli(
        "megatron-to-hf",
        tmp_path / "ckpt",
        out,
        "--no-tokenizer",
        "--check-finite",
        "--max-shard-size",
        "100KB",
        "--workers",
        2,
    )
    assert code == 2, output
    assert "NaN or Inf" in output and "mp_rank_00" in output and "Traceback" not in output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bench_projection_counts_the_start_up_once():
    """The benchmark's projection scales only the part of a wall time that grows with the bytes;
    the fixed start-up (Python, torch, the converter's imports) is paid once."""
    from conversion_bench import report

    def result(depth, wall, floor, size):
        r = report.Result("megatron-to-hf", "torch", depth, 1, size, size, 10, startup_s=2.0)
        r.floor_s, r.wall_s, r.peak_tree_rss, r.cpu_s = [floor], [wall], [100], [1.0]
        return r

    small, large = result(1, 12.0, 8.0, 10**9), result(2, 22.0, 16.0, 2 * 10**9)
    assert large.ratio == pytest.approx(22 / 16) and large.net_ratio == pytest.approx(20 / 16)
    text = report.projection([small, large], 100 * 10**9, 100 * 10**9)
    # 2 s + 20 s per 2 GB x 50 = 1002 s = 16.7 min, against 16 s per 2 GB x 50 = 800 s = 13.3 min.
    assert "16.7 min for 100.0 GB against a floor of 13.3 min (ratio 1.25)" in text
    assert "| 1.38 | 1.25 |" in report.table([large])


def test_bench_start_up_is_measured_with_a_bytecode_cache(tmp_path):
    from conversion_bench import measure

    env = measure.bytecode_cached_env({"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin"}, tmp_path / "c")
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "c")
    env = measure.bytecode_cached_env(dict(os.environ, PYTHONPATH=str(REPO)), tmp_path / "c")
    seconds = measure.startup_seconds(sys.executable, env, REPO, repeats=1)
    assert seconds > 0 and any((tmp_path / "c").rglob("engine*.pyc"))  # the converter was imported


def test_bench_floor_is_the_fastest_of_cat_dd_and_a_python_loop(tmp_path):
    """Each floor method copies every byte (checked here, not timed), the floor is the best of
    them, and no copy is left behind."""
    from conversion_bench import measure

    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(os.urandom(3 * MiB + 5))
    (source / "sub" / "b.bin").write_bytes(os.urandom(1000))
    for method in measure.FLOOR_METHODS:
        copy = tmp_path / method
        if method == "loop":
            copied = measure.plain_copy(source, copy)
        else:
            copied = measure.tool_copy(method, source, copy)
        assert copied == 3 * MiB + 1005
        for file in measure.files_under(source):
            assert (copy / file.relative_to(source)).read_bytes() == file.read_bytes(), (method, file)
    floor = measure.timed_floor(source, tmp_path / "floor")
    assert set(floor.seconds) == set(measure.FLOOR_METHODS) and floor.copied == 3 * MiB + 1005
    assert floor.best == min(floor.seconds.values()) and floor.best_method in measure.FLOOR_METHODS
    assert not (tmp_path / "floor").exists()
    assert len(floor.load_average.split()) == 3


def test_bench_synthetic_tensors_are_fresh_incompressible_finite_and_seeded():
    """No repeated block (a deduplicating or compressing layer could copy those for less), every
    value finite, the dummy ViT heads zero, the same name giving the same bytes."""
    import zlib

    config = get_config("tiny", **MEDIUM)
    table = synthetic.NVLMD.table(config)
    source = synthetic.SyntheticSource(config, table)
    name = max(source.shapes, key=lambda n: torch.Size(source.shapes[n]).numel())
    tensor = source.get(name)
    assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == tuple(source.shapes[name])
    assert bool(torch.isfinite(tensor).all())
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(data) >= 4 * MiB and data[:MiB] != data[MiB : 2 * MiB]
    assert len(zlib.compress(data, 1)) > 0.9 * len(data)
    assert torch.equal(source.get(name).view(torch.int16), tensor.view(torch.int16))
    twins = [n for n in source.shapes if n != name and source.shapes[n] == source.shapes[name]]
    for twin in twins[:1]:  # another tensor of the same shape: other bytes
        assert not torch.equal(source.get(twin).view(torch.int16), tensor.view(torch.int16))
    padded = [n for n in source.shapes if n in source._padded_heads]
    assert padded, "the tiny slice has padded ViT heads"
    for head_name in padded:
        transform = source._padded_heads[head_name]
        values = source.get(head_name)
        if isinstance(transform, synthetic.ViTQKV):
            dummy = values.view(3, transform.hf_heads, transform.head_dim, -1)[:, transform.real_heads :]
        else:
            dummy = values.view(values.shape[0], transform.hf_heads, transform.head_dim)[
                :, transform.real_heads :
            ]
        assert dummy.numel() and not dummy.any()
