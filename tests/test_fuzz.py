"""A bounded fuzz of the readers (issue 7, item 6): random truncations and byte flips of a tiny
legacy checkpoint's rank file, of a torch_dist .distcp file and of a converted shard never end in a
traceback. The conversion either succeeds (the damage hit tensor values, which nothing can tell)
or says what is wrong in one line (exit 2); `verify` reports a damaged shard as not matching the
manifest (exit 1).

Examples are drawn deterministically (derandomize) so that CI sees the same ones; set
NVLM_PORT_FUZZ_EXAMPLES to draw more, with a fresh seed, when hunting."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import cli

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("megatron.core", reason="the checkpoints are made by the Megatron side")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HUNTING = int(os.environ.get("NVLM_PORT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=HUNTING or 40,
    derandomize=not HUNTING,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
EDGE = 4096  # the zip's local headers and pickle sit at the start, its directory at the end


def damages(size: int):
    """A truncation, or one to eight byte flips (distinct bytes: the file always changes), biased
    towards a file's first and last bytes."""
    position = st.one_of(
        st.integers(0, min(EDGE, size - 1)),
        st.integers(max(0, size - EDGE), size - 1),
        st.integers(0, size - 1),
    )
    truncate = st.tuples(st.just("truncate"), st.integers(0, size - 1))
    flip = st.tuples(position, st.integers(1, 255))
    flips = st.tuples(st.just("flip"), st.lists(flip, min_size=1, max_size=8, unique_by=lambda f: f[0]))
    return st.one_of(truncate, flips)


def damage(path: Path, how) -> None:
    kind, detail = how
    raw = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[:detail])
        return
    changed = bytearray(raw)
    for position, mask in detail:
        changed[position] ^= mask
    path.write_bytes(bytes(changed))


def _one_clear_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def legacy_source(checkpoints):
    return checkpoints["tp1-te"]


RANK = Path("iter_0000001") / "mp_rank_00" / "model_optim_rng.pt"


def test_a_damaged_rank_file_converts_or_is_refused_in_one_line(legacy_source):
    size = (legacy_source / RANK).stat().st_size

    @FUZZ
    @given(how=damages(size))
    def check(how):
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "ckpt"
            shutil.copytree(legacy_source, source)
            damage(source / RANK, how)
            code, output = cli("megatron-to-hf", source, Path(tmp) / "out", "--no-tokenizer")
            assert code in (0, 2), output
            if code == 2:
                _one_clear_line(output)
                assert not (Path(tmp) / "out").exists()
            assert not list(Path(tmp).glob(".out.partial-*"))

    check()


def test_a_damaged_distcp_file_converts_or_is_refused_in_one_line(checkpoints):
    source = checkpoints["tp2-dist"]
    files = sorted(p.name for p in (source / "iter_0000001").glob("*.distcp"))
    sizes = {name: (source / "iter_0000001" / name).stat().st_size for name in files}

    @FUZZ
    @given(data=st.data())
    def check(data):
        name = data.draw(st.sampled_from(files), label="file")
        how = data.draw(damages(sizes[name]), label="damage")
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "ckpt"
            shutil.copytree(source, copy)
            damage(copy / "iter_0000001" / name, how)
            code, output = cli("megatron-to-hf", copy, Path(tmp) / "out", "--no-tokenizer")
            assert code in (0, 2), output
            if code == 2:
                _one_clear_line(output)
            assert sorted(p.name for p in Path(tmp).iterdir()) == (["ckpt", "out"] if code == 0 else ["ckpt"])

    check()


@pytest.fixture(scope="module")
def converted(legacy_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "hf"
    code, output = cli("megatron-to-hf", legacy_source, out, "--no-tokenizer", "--max-shard-size", "1MB")
    assert code == 0, output
    return out


def test_a_damaged_shard_fails_verify_by_its_checksum(converted):
    shards = sorted(p.name for p in converted.glob("model-*.safetensors"))
    assert len(shards) > 1
    sizes = {name: (converted / name).stat().st_size for name in shards}

    @FUZZ
    @given(data=st.data())
    def check(data):
        shard = data.draw(st.sampled_from(shards), label="shard")
        how = data.draw(damages(sizes[shard]), label="damage")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "hf"
            shutil.copytree(converted, folder)
            damage(folder / shard, how)
            code, output = cli("verify", folder)
            assert code == 1 and "Traceback" not in output, output
            named = [line for line in output.splitlines() if line.strip().startswith(f"{shard}: ")]
            assert any("the manifest" in line for line in named), output

    check()


# -- issue 15: structured fuzz of what args, `.metadata` and config.json claim ----------------------
# Each example runs under a time and memory bound: a claim of 2**40 layers must be refused from the
# tensors present, not attempted.

FEW = settings(FUZZ, max_examples=HUNTING or 10)
EXAMPLE_SECONDS = 60
EXAMPLE_MEMORY = 4 << 30  # address space an example may add to the test process


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def bounded(run):
    """Run `run()` with at most EXAMPLE_MEMORY more address space (RLIMIT_AS) and fail it when it
    takes longer than EXAMPLE_SECONDS."""
    import resource
    import time

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + EXAMPLE_MEMORY
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    started = time.perf_counter()
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        result = run()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert time.perf_counter() - started < EXAMPLE_SECONDS
    return result


SIZES = st.one_of(
    st.integers(-3, 3),
    st.integers(4, 2**12),
    st.sampled_from([2**20, 2**31, 2**40, 10**12]),
)
CLAIMS = st.one_of(SIZES, st.none(), st.text(max_size=4), st.floats(allow_nan=True), st.booleans())


def _converts_or_one_line(code: int, output: str, tmp: Path) -> None:
    assert code in (0, 2), output
    if code == 2:
        _one_clear_line(output)
    assert not list(tmp.glob(".*.partial-*"))


ARGS_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "padded_vocab_size",
    "vocab_size",
    "seq_length",
    "max_position_embeddings",
    "kv_channels",
)


def test_args_fields_claiming_any_size_convert_or_are_refused(legacy_source):
    import torch

    from converter.formats import safe_pickle

    @FEW
    @given(field=st.sampled_from(ARGS_FIELDS), value=CLAIMS)
    def check(field, value):
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "ckpt"
            shutil.copytree(legacy_source, source)
            state = safe_pickle.load(source / RANK, mmap=False)
            setattr(state["args"], field, value)
            torch.save(state, source / RANK)
            code, output = bounded(lambda: cli("megatron-to-hf", source, Path(tmp) / "out", "--no-tokenizer"))
            _converts_or_one_line(code, output, Path(tmp))

    check()


def test_dcp_metadata_claiming_any_shape_or_damaged_converts_or_is_refused(checkpoints):
    import pickle

    import torch

    from converter.formats import safe_pickle

    source = checkpoints["tp2-dist"]
    meta_path = Path("iter_0000001") / ".metadata"
    metadata = safe_pickle.load_dcp_metadata(source / meta_path)
    keys = sorted(k for k, m in metadata.state_dict_metadata.items() if hasattr(m, "size"))
    size = (source / meta_path).stat().st_size

    @FEW
    @given(data=st.data())
    def check(data):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "ckpt"
            shutil.copytree(source, copy)
            if data.draw(st.booleans(), label="bytes"):
                damage(copy / meta_path, data.draw(damages(size), label="damage"))
            else:
                changed = safe_pickle.load_dcp_metadata(copy / meta_path)
                key = data.draw(st.sampled_from(keys), label="tensor")
                meta = changed.state_dict_metadata[key]
                dim = data.draw(st.integers(0, len(meta.size) - 1), label="dim")
                shape = list(meta.size)
                shape[dim] = data.draw(SIZES, label="size")
                meta.size = torch.Size(shape)
                (copy / meta_path).write_bytes(pickle.dumps(changed))
            code, output = bounded(lambda: cli("megatron-to-hf", copy, Path(tmp) / "out", "--no-tokenizer"))
            _converts_or_one_line(code, output, Path(tmp))

    check()


CONFIG_FIELDS = (
    ("llm_config", "hidden_size"),
    ("llm_config", "intermediate_size"),
    ("llm_config", "num_hidden_layers"),
    ("llm_config", "num_attention_heads"),
    ("llm_config", "num_key_value_heads"),
    ("llm_config", "vocab_size"),
    ("vision_config", "hidden_size"),
    ("vision_config", "num_hidden_layers"),
    ("vision_config", "num_attention_heads"),
    ("vision_config", "intermediate_size"),
    ("vision_config", "image_size"),
    ("vision_config", "patch_size"),
    (None, "downsample_ratio"),
    (None, "num_image_token"),
)


def test_config_json_claiming_anything_converts_or_is_refused(converted):
    import json

    @FEW
    @given(field=st.sampled_from(CONFIG_FIELDS), value=CLAIMS, tp=st.sampled_from(["1", "2"]))
    def check(field, value, tp):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "hf"
            shutil.copytree(converted, folder)
            config = json.loads((folder / "config.json").read_text())
            section, key = field
            (config[section] if section else config)[key] = value
            (folder / "config.json").write_text(json.dumps(config))
            code, output = bounded(lambda: cli("hf-to-megatron", folder, Path(tmp) / "mega", "--tp", tp))
            _converts_or_one_line(code, output, Path(tmp))
            if code == 2:
                assert not (Path(tmp) / "mega").exists()

    check()
