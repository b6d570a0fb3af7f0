"""Tests for modeling/processing_nvlm_d.py: tiling, pixel tensors and prompt strings.

The module is loaded straight from its file, the way a converted model folder loads it
as remote code, so these tests also prove it does not lean on the rest of the project.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODULE_PATH = REPO / "modeling" / "processing_nvlm_d.py"
REFERENCE_DIR = REPO.parent / "shared" / "reference" / "nvlm-d-72b"


def _load_standalone(path: Path):
    spec = importlib.util.spec_from_file_location("nvlm_processing_standalone", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


P = _load_standalone(MODULE_PATH)

PAD = "<|vision_pad|>"
SYS = "<|im_start|>system\nAnswer the questions.<|im_end|>"
ASSISTANT = "<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------
# remote-code constraint
# --------------------------------------------------------------------------------------


def test_module_imports_only_stdlib_numpy_torch_pil_transformers():
    tree = ast.parse(MODULE_PATH.read_text())
    allowed_third_party = {"numpy", "torch", "PIL", "transformers"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break when the file is copied as remote code"
            roots = [node.module.split(".")[0]]
        elif isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        else:
            continue
        for root in roots:
            assert root in allowed_third_party or root in sys.stdlib_module_names, root


# --------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------


def brute_force_grid(width, height, image_size, max_num, min_num=1):
    """The InternVL rule restated without the sequential loop.

    Among the grids at the smallest aspect-ratio distance (in tile-count order), the first
    wins unless a later one has room for less than twice the image's pixels; then the last
    such later one wins.
    """
    grids = [
        (c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num
    ]
    grids.sort(key=lambda g: (g[0] * g[1], g[0]))
    aspect = width / height
    diffs = [abs(aspect - c / r) for c, r in grids]
    tied = [g for g, d in zip(grids, diffs) if d == min(diffs)]
    roomy = [(c, r) for c, r in tied[1:] if width * height > 0.5 * image_size**2 * c * r]
    return roomy[-1] if roomy else tied[0]


def n_tiles_for(grid):
    cols, rows = grid
    return cols * rows + (1 if cols * rows > 1 else 0)


def test_candidate_grids_sorted_and_complete():
    grids = P.candidate_grids(1, 6)
    assert len(grids) == len(set(grids)) == 14
    assert all(1 <= c * r <= 6 for c, r in grids)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)
    assert grids[0] == (1, 1)
    assert P.candidate_grids(1, 6) == grids  # deterministic
    assert P.candidate_grids(4, 4) == [(1, 4), (2, 2), (4, 1)]


@pytest.mark.parametrize(
    ("size", "expected_grid", "expected_tiles"),
    [
        ((448, 448), (1, 1), 1),  # fits one tile: no thumbnail
        ((896, 448), (2, 1), 3),  # 2:1
        ((448, 896), (1, 2), 3),  # 1:2
        ((1344, 896), (3, 2), 7),  # 3:2
        ((4000, 500), (6, 1), 7),  # very wide: capped at 6 columns
        ((500, 500), (1, 1), 1),  # square tie (1,1)/(2,2): too small for 2x2
        ((1000, 1000), (2, 2), 5),  # square tie: big enough for 2x2
    ],
)
def test_tile_counts_448(size, expected_grid, expected_tiles):
    width, height = size
    grids = P.candidate_grids(1, 6)
    assert P.find_closest_aspect_ratio(width / height, grids, width, height, 448) == expected_grid
    assert brute_force_grid(width, height, 448, 6) == expected_grid
    tiles = P.dynamic_preprocess(Image.new("RGB", size, "gray"), max_num=6, image_size=448)
    assert len(tiles) == expected_tiles
    assert all(t.size == (448, 448) for t in tiles)


@pytest.mark.parametrize("size", [(800, 600), (600, 800), (1280, 720), (333, 1000), (2000, 1500), (640, 480)])
def test_tile_counts_match_brute_force(size):
    width, height = size
    grid = brute_force_grid(width, height, 448, 6)
    got = P.find_closest_aspect_ratio(width / height, P.candidate_grids(1, 6), width, height, 448)
    assert got == grid
    tiles = P.dynamic_preprocess(Image.new("RGB", size), max_num=6, image_size=448)
    assert len(tiles) == n_tiles_for(grid)


def test_800x600_worked_by_hand():
    # 4:3 = 1.333; (3,2)=1.5 is 0.167 away, every other grid with <= 6 tiles is further.
    assert brute_force_grid(800, 600, 448, 6) == (3, 2)
    assert len(P.dynamic_preprocess(Image.new("RGB", (800, 600)))) == 7


@pytest.mark.parametrize(
    ("size", "expected_tiles"),
    [
        ((64, 64), 1),
        ((128, 64), 3),
        ((90, 90), 1),  # 8100 px <= 0.5 * 64^2 * 4 = 8192: stays one tile
        ((100, 100), 5),  # 10000 px > 8192: the tie goes to 2x2
        ((640, 64), 7),  # 10:1 -> 6x1
    ],
)
def test_tile_counts_small_image_size(size, expected_tiles):
    tiles = P.dynamic_preprocess(Image.new("RGB", size), max_num=6, image_size=64)
    assert len(tiles) == expected_tiles == n_tiles_for(brute_force_grid(*size, 64, 6))
    assert all(t.size == (64, 64) for t in tiles)


def test_no_thumbnail_when_disabled():
    tiles = P.dynamic_preprocess(Image.new("RGB", (896, 448)), image_size=448, use_thumbnail=False)
    assert len(tiles) == 2


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def grid_image(cols, rows, cell):
    """An image made of cols x rows solid cells, coloured row-major from COLOURS."""
    array = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
    for i in range(cols * rows):
        row, col = divmod(i, cols)
        array[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = COLOURS[i]
    return Image.fromarray(array)


@pytest.mark.parametrize(("cols", "rows"), [(2, 2), (3, 2), (2, 3)])
def test_tiles_are_row_major(cols, rows):
    # Cells are exactly one tile, so the resize is the identity and colours stay exact.
    tiles = P.dynamic_preprocess(grid_image(cols, rows, 64), max_num=6, image_size=64)
    assert len(tiles) == cols * rows + 1
    for i, tile in enumerate(tiles[:-1]):
        assert np.asarray(tile).reshape(-1, 3).mean(0).tolist() == list(COLOURS[i]), f"tile {i}"
    thumb_mean = np.asarray(tiles[-1], dtype=np.float64).reshape(-1, 3).mean(0)
    assert np.allclose(thumb_mean, np.mean(COLOURS[: cols * rows], axis=0), atol=2.0)


def test_tiles_row_major_after_resize():
    # 2x2 colours on a 1000x1000 image, downscaled to 2x2 tiles of 448: each tile is one colour.
    # (A 200x200 image would stay one tile: too few pixels for the 2x2 grid on the 1:1 tie.)
    pixel_values = P.image_to_pixel_values(grid_image(2, 2, 500), image_size=448, max_num=6)
    assert pixel_values.shape == (5, 3, 448, 448)
    mean = torch.tensor(P.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(P.IMAGENET_STD).view(3, 1, 1)
    rgb = (pixel_values * std + mean) * 255
    for i in range(4):
        centre = rgb[i, :, 100:348, 100:348].mean(dim=(1, 2))
        assert torch.allclose(centre, torch.tensor(COLOURS[i], dtype=torch.float32), atol=1.0), i


# --------------------------------------------------------------------------------------
# pixel tensors
# --------------------------------------------------------------------------------------


def expected_constant(value):
    return torch.tensor([(value - m) / s for m, s in zip(P.IMAGENET_MEAN, P.IMAGENET_STD)])


@pytest.mark.parametrize(("colour", "value"), [("white", 1.0), ("black", 0.0)])
def test_pixel_values_normalisation(colour, value):
    pixel_values = P.image_to_pixel_values(Image.new("RGB", (600, 400), colour))
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == (7, 3, 448, 448)  # 3:2 -> 3x2 tiles + thumbnail
    per_channel = pixel_values.permute(1, 0, 2, 3).reshape(3, -1)
    want = expected_constant(value).view(3, 1)
    assert (per_channel - want).abs().max().item() < 1e-6


def test_to_tensor_resizes_and_converts_to_rgb():
    out = P.to_tensor(Image.new("L", (100, 50), 255), 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0, 0], expected_constant(1.0), atol=1e-6)


def test_image_to_pixel_values_accepts_paths(tmp_path):
    image = Image.new("RGBA", (896, 448), (0, 0, 0, 255))
    path = tmp_path / "black.png"
    image.save(path)
    from_path = P.image_to_pixel_values(path)
    from_str = P.image_to_pixel_values(str(path))
    from_pil = P.image_to_pixel_values(image)
    assert from_path.shape == (3, 3, 448, 448)
    assert torch.equal(from_path, from_str) and torch.equal(from_path, from_pil)


PUBLISHED_PREPROCESSOR = {
    "crop_size": 448,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 448,
}


def test_processor_config_round_trip():
    processor = P.NVLMImageProcessor.from_dict(PUBLISHED_PREPROCESSOR)
    assert processor.image_size == 448 and processor.max_num == 6 and processor.use_thumbnail
    config = processor.to_dict()
    # What we write is transformers' GotOcr2ImageProcessor form (tests/test_hf_processors.py) ...
    assert config["image_processor_type"] == "GotOcr2ImageProcessor"
    assert config["size"] == {"height": 448, "width": 448} and config["crop_to_patches"] is True
    assert (config["min_patches"], config["max_patches"]) == (1, 6)
    # ... plus the tiling settings under our own names, and it reads back as it was.
    assert config["max_dynamic_patch"] == 6 and config["use_thumbnail"] is True
    assert P.NVLMImageProcessor.from_dict(config).__dict__ == processor.__dict__
    again = P.NVLMImageProcessor.from_dict({**config, "max_dynamic_patch": 4})
    assert again.max_num == 4
    # Without a thumbnail there is no GotOcr2 form: the published (CLIP-style) fields are written.
    no_thumb = P.NVLMImageProcessor.from_dict({**config, "use_thumbnail": False})
    assert no_thumb.use_thumbnail is False
    assert {k: no_thumb.to_dict()[k] for k in PUBLISHED_PREPROCESSOR} == PUBLISHED_PREPROCESSOR
    with pytest.raises(ValueError):
        P.NVLMImageProcessor.from_dict({**PUBLISHED_PREPROCESSOR, "resample": 2})


@pytest.mark.skipif(not REFERENCE_DIR.is_dir(), reason=f"reference folder absent: {REFERENCE_DIR}")
def test_processor_reads_published_file():
    import json

    config = json.loads((REFERENCE_DIR / "preprocessor_config.json").read_text())
    processor = P.NVLMImageProcessor.from_dict(config)
    assert (processor.image_size, processor.image_mean, processor.image_std) == (
        448,
        P.IMAGENET_MEAN,
        P.IMAGENET_STD,
    )


def test_processor_call_single_and_list():
    processor = P.NVLMImageProcessor(image_size=64)
    one = processor(Image.new("RGB", (64, 64)))
    assert one["num_patches_list"] == [1] and one["pixel_values"].shape == (1, 3, 64, 64)
    both = processor([Image.new("RGB", (128, 64)), Image.new("RGB", (64, 64), "white")])
    assert both["num_patches_list"] == [3, 1]
    assert both["pixel_values"].shape == (4, 3, 64, 64)
    assert torch.allclose(both["pixel_values"][3, :, 0, 0], expected_constant(1.0), atol=1e-6)


# --------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------


def test_tile_tags():
    assert P.tile_tags(1) == ["<tile_global_thumbnail>"]
    assert P.tile_tags(3) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]
    with pytest.raises(ValueError):
        P.tile_tags(0)


def test_one_tile_prompt_literal():
    expected = (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n"
        "<Image><tile_global_thumbnail><|vision_pad|><|vision_pad|></Image>\n"
        "What is this?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert P.build_prompt("What is this?", [1], num_image_token=2) == expected


def test_seven_tile_prompt_literal():
    expected = (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n"
        "<Image>"
        "<tile_1><|vision_pad|><|vision_pad|>"
        "<tile_2><|vision_pad|><|vision_pad|>"
        "<tile_3><|vision_pad|><|vision_pad|>"
        "<tile_4><|vision_pad|><|vision_pad|>"
        "<tile_5><|vision_pad|><|vision_pad|>"
        "<tile_6><|vision_pad|><|vision_pad|>"
        "<tile_global_thumbnail><|vision_pad|><|vision_pad|>"
        "</Image>\n"
        "Describe the image.<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert P.build_prompt("Describe the image.", [7], num_image_token=2) == expected


@pytest.mark.parametrize("n_tiles", [1, 3, 7])
def test_prompt_with_256_image_tokens(n_tiles):
    prompt = P.build_prompt("Q?", [n_tiles], num_image_token=256)
    assert prompt.count(PAD) == 256 * n_tiles
    assert prompt.count("<tile_global_thumbnail>" + PAD * 256) == 1
    assert prompt.count("<tile_") == n_tiles
    assert prompt.count("<Image>") == prompt.count("</Image>") == 1
    assert "\n<|im_start|>" not in prompt  # MPT style: no newline after <|im_end|>
    assert prompt.startswith(SYS + "<|im_start|>user\n<Image><tile_")
    assert prompt.endswith("</Image>\nQ?<|im_end|>" + ASSISTANT)


def test_text_only_prompt():
    expected = (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHello<|im_end|>" + ASSISTANT
    )
    assert P.build_prompt("Hello", [], num_image_token=256) == expected
    assert P.build_conversation("Hello") == expected


def test_system_message_omitted_when_empty():
    for empty in (None, ""):
        assert (
            P.build_conversation("Hi", system_message=empty) == "<|im_start|>user\nHi<|im_end|>" + ASSISTANT
        )
    custom = P.build_conversation("Hi", system_message="Be brief.")
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi")


def test_two_turn_conversation_with_history():
    history = [("<image>\nWhat is it?", "A cat.")]
    prompt = P.build_prompt("What colour?", [1], num_image_token=1, history=history)
    expected = (
        SYS + "<|im_start|>user\n<Image><tile_global_thumbnail><|vision_pad|></Image>\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nWhat colour?<|im_end|>" + ASSISTANT
    )
    assert prompt == expected
    # With history the marker is not added for you: images without a marker are an error.
    with pytest.raises(ValueError):
        P.build_prompt("What colour?", [1], num_image_token=1, history=[("Hi", "Hello")])


def test_text_history_without_images():
    prompt = P.build_prompt("And 3+3?", [], num_image_token=4, history=[("2+2?", "4")])
    expected = (
        SYS + "<|im_start|>user\n2+2?<|im_end|><|im_start|>assistant\n4<|im_end|>"
        "<|im_start|>user\nAnd 3+3?<|im_end|>" + ASSISTANT
    )
    assert prompt == expected


def test_two_images_with_explicit_markers():
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    prompt = P.build_prompt(question, [1, 3], num_image_token=1)
    expected = (
        SYS + "<|im_start|>user\n"
        "Image-1: <Image><tile_global_thumbnail><|vision_pad|></Image>\n"
        "Image-2: <Image><tile_1><|vision_pad|><tile_2><|vision_pad|>"
        "<tile_global_thumbnail><|vision_pad|></Image>\n"
        "Compare them.<|im_end|>" + ASSISTANT
    )
    assert prompt == expected


@pytest.mark.parametrize(
    ("question", "num_patches_list"),
    [
        ("<image>\n<image>\nTwo markers, one image", [1]),
        ("<image>\nOne marker, two images", [1, 7]),
        ("No marker, two images", [1, 7]),  # the auto-prefix adds only one marker
        ("<image>\nA marker but no image", []),
    ],
)
def test_marker_image_mismatch_raises(question, num_patches_list):
    with pytest.raises(ValueError, match="marker"):
        P.build_prompt(question, num_patches_list, num_image_token=2)


def test_split_response():
    assert P.split_response("  The answer.\n<|im_end|><|im_start|>user\n") == "The answer."
    assert P.split_response("no separator here ") == "no separator here"
    assert P.split_response("a</s>b", sep="</s>") == "a"


# --------------------------------------------------------------------------------------
# the real Qwen2.5 tokenizer of the published release
# --------------------------------------------------------------------------------------

VISION_PAD_ID = 151654
IM_START_ID = 151644
IM_END_ID = 151645


@pytest.fixture(scope="module")
def tokenizer():
    if not (REFERENCE_DIR / "vocab.json").is_file():
        pytest.skip(f"published NVLM-D-72B tokenizer files not found under {REFERENCE_DIR}")
    from transformers import AutoTokenizer

    # trust_remote_code=False: config.json names remote classes; only the tokenizer is wanted,
    # and without it transformers asks on stdin whether to run that code.
    return AutoTokenizer.from_pretrained(str(REFERENCE_DIR), local_files_only=True, trust_remote_code=False)


def test_tokenizer_special_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(P.IMG_CONTEXT_TOKEN) == VISION_PAD_ID
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == IM_START_ID
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END_ID
    assert tokenizer.eos_token_id == IM_END_ID


@pytest.mark.parametrize("n_tiles", [1, 7])
def test_real_tokenizer_prompt_ids(tokenizer, n_tiles):
    prompt = P.build_prompt("Describe the image in detail.", [n_tiles], num_image_token=256)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(VISION_PAD_ID) == 256 * n_tiles
    assert ids[0] == IM_START_ID
    tail = tokenizer(ASSISTANT, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tail) == ["<|im_start|>", "assistant", "Ċ"]
    assert ids[-len(tail) :] == tail
    assert ids[-len(tail) - 1] == IM_END_ID
    assert tokenizer.decode(ids) == prompt
    # add_special_tokens=True must not add a BOS either (Qwen2 has none).
    assert tokenizer(prompt)["input_ids"] == ids


def test_bpe_merges_across_tag_boundaries(tokenizer):
    """Documents the trap of NVLM_FACTS section 2: HF tokenizes the whole prompt string,
    Megatron tokenizes each tag alone; the ids differ at the boundaries."""

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def pieces(text):
        return tokenizer.convert_ids_to_tokens(encode(text))

    # Alone, each tile tag is 5 tokens.
    assert pieces("<tile_1>") == ["<", "tile", "_", "1", ">"]
    assert pieces("<tile_global_thumbnail>") == ["<", "tile", "_global", "_thumbnail", ">"]
    assert pieces("<Image>") == ["<Image", ">"]
    # Together, '>' and '<' merge into one '><' token: not the concatenation of the parts.
    assert pieces("<Image><tile_1>") == ["<Image", "><", "tile", "_", "1", ">"]
    assert encode("<Image><tile_1>") != encode("<Image>") + encode("<tile_1>")
    # And '</Image>' swallows the newline after it.
    assert pieces("</Image>\nQ") == ["</", "Image", ">Ċ", "Q"]
    # After an image-context token (a special token) the tag starts fresh, so these split as alone.
    assert encode(P.IMG_CONTEXT_TOKEN + "<tile_2>") == [VISION_PAD_ID, *encode("<tile_2>")]
