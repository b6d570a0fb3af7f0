"""transformers' own processing pieces on a converted folder (issue 16, item 3).

- `AutoImageProcessor.from_pretrained(folder)` is transformers' GotOcr2ImageProcessor, whose tiles
  equal modeling/processing_nvlm_d.py's bit for bit (PIL backend; the torchvision one differs);
- `AutoProcessor.from_pretrained(folder)` is our NVLMProcessor: image + question in, the input_ids
  and pixel_values of chat()'s own path out, so the model gives the same logits;
- the folder's chat template renders chat()'s prompt, with the tiny and with the release tokenizer.

The folder is made by the real CLI (`megatron-to-hf` of a tiny Megatron checkpoint), so the order in
which it writes the extras and copies the tokenizer is the one users get.
"""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
from conftest import REFERENCE, TINY_TOKENIZER, cli, make_megatron_checkpoint, run_without_nvlm_port
from PIL import Image

from modeling import processing_nvlm_d as P

QUESTION = "What is shown?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_processors")
    ckpt = make_megatron_checkpoint(root / "megatron", "--preset", "tiny")
    code, output = cli("megatron-to-hf", ckpt, root / "hf", "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    return root / "hf"


@pytest.fixture(scope="module")
def config(folder):
    from modeling import NVLM_D_Config

    return NVLM_D_Config.from_pretrained(folder)


@pytest.fixture(scope="module")
def processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def auto_image_processor(path):
    """AutoImageProcessor as a user calls it; the PIL backend named where torchvision is installed
    (transformers 5 would take torchvision's resize there, whose tiles differ from PIL's)."""
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    kwargs = {"backend": "pil"} if is_torchvision_available() else {}
    return AutoImageProcessor.from_pretrained(path, **kwargs)


def random_image(rng, max_side, mode="RGB"):
    """Noise, gradients or blocks, of a random size and aspect ratio (1:12 .. 12:1); one in four
    has an exact grid ratio, where the tie rule decides the grid."""
    aspect = float(np.exp(rng.uniform(np.log(1 / 12), np.log(12))))
    area = float(np.exp(rng.uniform(np.log(16 * 16), np.log(max_side * max_side))))
    width, height = max(1, round((area * aspect) ** 0.5)), max(1, round((area / aspect) ** 0.5))
    if rng.integers(4) == 0:
        cols, rows = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 1), (3, 2), (2, 3), (4, 1), (6, 1)][rng.integers(9)]
        k = int(rng.integers(1, max(2, max_side // (8 * max(cols, rows)))))
        width, height = 8 * cols * k, 8 * rows * k
    kind = rng.integers(3)
    if kind == 0:
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    elif kind == 1:
        x = np.linspace(0, 1, width)[None, :, None]
        y = np.linspace(0, 1, height)[:, None, None]
        array = (255 * (0.5 + 0.5 * np.sin(7 * x + 5 * y + np.arange(3)))).astype(np.uint8)
    else:
        cells = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        array = np.repeat(np.repeat(cells, 8, 0), 8, 1)[:height, :width]
    return Image.fromarray(array).convert(mode)


def noise_image(size, seed):
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    )


# --------------------------------------------------------------------------------------
# the files
# --------------------------------------------------------------------------------------


def test_folder_processing_files(folder, config):
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "GotOcr2ImageProcessor"
    assert pre["crop_to_patches"] is True and pre["resample"] == 3
    assert pre["size"] == {"height": config.image_size, "width": config.image_size}
    assert (pre["min_patches"], pre["max_patches"]) == (1, config.max_dynamic_patch)
    assert (pre["max_dynamic_patch"], pre["use_thumbnail"]) == (config.max_dynamic_patch, True)  # ours too
    assert pre["image_mean"] == list(P.IMAGENET_MEAN) and pre["image_std"] == list(P.IMAGENET_STD)
    assert P.NVLMImageProcessor.from_dict(pre).to_dict() == {
        k: v for k, v in pre.items() if k not in ("processor_class", "auto_map")
    }
    proc = json.loads((folder / "processor_config.json").read_text())
    assert proc["auto_map"] == pre["auto_map"] == {"AutoProcessor": "processing_nvlm_d.NVLMProcessor"}
    assert proc["num_image_token"] == config.num_image_token and proc["image_token"] == "<|vision_pad|>"
    assert (folder / "chat_template.jinja").read_text() == P.CHAT_TEMPLATE


# --------------------------------------------------------------------------------------
# AutoImageProcessor: transformers' GotOcr2ImageProcessor, tiles equal to ours
# --------------------------------------------------------------------------------------


def assert_same_tiles(image_processor, images, image_size, max_num):
    for image in images:
        ours = P.image_to_pixel_values(image, image_size=image_size, max_num=max_num)
        theirs = image_processor(image, return_tensors="pt")
        assert theirs["num_patches"].tolist() == [ours.shape[0]], image.size
        assert torch.equal(theirs["pixel_values"], ours), (image.size, image.mode)


def test_auto_image_processor_is_got_ocr2_with_our_tiles(folder, config):
    image_processor = auto_image_processor(folder)
    assert type(image_processor).__name__.startswith("GotOcr2ImageProcessor")
    assert type(image_processor).__module__.startswith("transformers.models.got_ocr2")
    rng = np.random.default_rng(0)
    images = [random_image(rng, 400) for _ in range(40)]
    assert {P.image_to_pixel_values(im, config.image_size).shape[0] for im in images} >= {1, 3, 5, 7}
    assert_same_tiles(image_processor, images, config.image_size, config.max_dynamic_patch)


@pytest.mark.parametrize(("image_size", "max_num", "count"), [(448, 6, 6), (64, 12, 15), (448, 1, 3)])
def test_got_ocr2_tiles_equal_ours_other_settings(tmp_path, image_size, max_num, count):
    settings = P.NVLMImageProcessor(image_size=image_size, max_num=max_num).to_dict()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    rng = np.random.default_rng(image_size + max_num)
    images = [random_image(rng, 6 * image_size) for _ in range(count)]
    assert_same_tiles(auto_image_processor(tmp_path), images, image_size, max_num)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_got_ocr2_tiles_equal_ours_other_modes(folder, config, mode):
    rng = np.random.default_rng(1)
    images = [random_image(rng, 300, mode) for _ in range(4)]  # RGBA here: opaque
    assert_same_tiles(auto_image_processor(folder), images, config.image_size, config.max_dynamic_patch)


def test_transparency_dropped_as_the_release_does(folder, processor, config):
    """transformers blends alpha onto white; the release's load_image (.convert("RGB")) drops it,
    and so does NVLMProcessor (what chat()'s pixels are)."""
    array = np.zeros((64, 128, 4), dtype=np.uint8)
    array[..., 0] = 200
    array[..., 3] = 0  # fully transparent red
    image = Image.fromarray(array, "RGBA")
    ours = P.image_to_pixel_values(image, config.image_size, config.max_dynamic_patch)
    assert not torch.equal(auto_image_processor(folder)(image, return_tensors="pt")["pixel_values"], ours)
    assert torch.equal(processor(images=image, text=QUESTION)["pixel_values"], ours)


class _FakeProcessor:
    def __init__(self, name, backend):
        self.__class__ = type(name, (_FakeProcessor,), {})
        self.backend = backend

    def to_dict(self):
        return {**P.NVLMImageProcessor(image_size=64).to_dict(), "backend": self.backend}


def test_pil_image_processor_replaces_torchvision_and_fast_forms():
    from transformers import GotOcr2ImageProcessorPil

    for fake in (
        _FakeProcessor("GotOcr2ImageProcessor", "torchvision"),
        _FakeProcessor("GotOcr2ImageProcessorFast", None),
    ):
        pil = P.pil_image_processor(fake)
        assert type(pil).__name__ in ("GotOcr2ImageProcessorPil", "GotOcr2ImageProcessor")
        assert getattr(pil, "backend", "pil") == "pil"
        assert pil.max_patches == 6 and pil.size["height"] == 64
    already = GotOcr2ImageProcessorPil(**P.image_processor_config(64))
    assert P.pil_image_processor(already) is already


# --------------------------------------------------------------------------------------
# AutoProcessor: our NVLMProcessor, chat()'s prompt and pixels
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(folder):
    from modeling import NVLM_D_Model

    return NVLM_D_Model.from_pretrained(folder).eval()


def chat_inputs(model, tokenizer, pixel_values, question, **chat_kwargs):
    """The input_ids and pixel_values chat() hands to generate()."""
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return kwargs["input_ids"]

    original = model.generate
    model.generate = fake_generate
    try:
        model.chat(tokenizer, pixel_values, question, dict(max_new_tokens=1, do_sample=False), **chat_kwargs)
    finally:
        model.generate = original
    return seen["input_ids"], seen["pixel_values"]


def test_auto_processor_is_nvlm_processor(processor, config):
    assert type(processor).__name__ == "NVLMProcessor"
    assert processor.num_image_token == config.num_image_token
    assert type(processor.image_processor).__name__.startswith("GotOcr2ImageProcessor")
    assert getattr(processor.image_processor, "backend", "pil") == "pil"
    assert processor.chat_template == P.CHAT_TEMPLATE


@pytest.mark.parametrize("size", [(150, 100), (64, 64), (300, 60)])
def test_processor_gives_chat_inputs_and_logits(processor, tokenizer, model, config, size):
    image = noise_image(size, size[0])
    pixel_values = P.image_to_pixel_values(image, config.image_size, config.max_dynamic_patch)
    chat_ids, chat_pixels = chat_inputs(model, tokenizer, pixel_values, QUESTION)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert torch.equal(inputs["input_ids"], chat_ids)
    assert torch.equal(inputs["pixel_values"], chat_pixels)
    assert tokenizer.decode(inputs["input_ids"][0]) == P.build_prompt(
        QUESTION, [pixel_values.shape[0]], config.num_image_token
    )
    # the processor's own apply_chat_template, tokenizing, with the image in the message
    messages[0]["content"][0]["image"] = image
    tokenized = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert all(torch.equal(tokenized[k], inputs[k]) for k in inputs)
    # a bare question gets the marker where chat() puts it
    assert torch.equal(processor(images=image, text=prompt.replace("<image>\n", ""))["input_ids"], chat_ids)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(pixel_values=chat_pixels, input_ids=chat_ids).logits)


def test_processor_text_only_and_history(processor, tokenizer, model):
    chat_ids, _ = chat_inputs(model, tokenizer, None, "2+2?")
    prompt = processor.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    inputs = processor(text=prompt)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(inputs["input_ids"], chat_ids)

    history = [("<image>\nWhat is it?", "A cat.")]
    image = random_image(np.random.default_rng(5), 200)
    pixels = P.image_to_pixel_values(image, processor.image_processor.size["height"])
    chat_ids, _ = chat_inputs(model, tokenizer, pixels, "What colour?", history=history)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert torch.equal(processor(images=image, text=prompt)["input_ids"], chat_ids)


def test_processor_two_images_and_mismatches(processor, config):
    rng = np.random.default_rng(2)
    first, second = random_image(rng, 100).resize((64, 64)), random_image(rng, 100).resize((200, 64))
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    inputs = processor(images=[first, second], text=question)
    tiles = [
        P.image_to_pixel_values(im, config.image_size, config.max_dynamic_patch) for im in (first, second)
    ]
    assert torch.equal(inputs["pixel_values"], torch.cat(tiles))
    expected = P.build_prompt(question, [t.shape[0] for t in tiles], config.num_image_token)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    assert (
        processor.tokenizer.decode(processor(images=[first, second], text=prompt)["input_ids"][0]) == expected
    )
    with pytest.raises(ValueError, match="marker"):
        processor(images=[first, second], text="<image>\nOne marker")
    with pytest.raises(ValueError, match="marker"):
        processor(text="<image>\nA marker, no image")
    two_turns = "<|im_start|>user\nHi<|im_end|><|im_start|>user\nLook<|im_end|>"
    with pytest.raises(ValueError, match="marker"):
        processor(images=first, text=two_turns)


# --------------------------------------------------------------------------------------
# the chat template
# --------------------------------------------------------------------------------------

CONVERSATIONS = {
    "text": ([{"role": "user", "content": "Hello"}], dict(question="Hello", num_patches_list=[])),
    "image": (
        [{"role": "user", "content": "<image>\n" + QUESTION}],
        dict(question=QUESTION, num_patches_list=[7]),
    ),
    "image-parts": (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        dict(question=QUESTION, num_patches_list=[3]),
    ),
    "system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        dict(question="Hi", num_patches_list=[], system_message="Be brief."),
    ),
    "no-system": (
        [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
        dict(question="Hi", num_patches_list=[], system_message=""),
    ),
    "history": (
        [
            {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "What colour?"},
        ],
        dict(question="What colour?", num_patches_list=[1], history=[("<image>\nWhat is it?", "A cat.")]),
    ),
}


def assert_template_is_chat_prompt(tokenizer, num_image_token):
    for name, (messages, prompt_args) in CONVERSATIONS.items():
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        num_patches_list = prompt_args["num_patches_list"]
        expected = P.build_prompt(num_image_token=num_image_token, **prompt_args)
        assert P.expand_image_markers(rendered, num_patches_list, num_image_token) == expected, name
        # with the placeholder already expanded in the message, the template keeps it verbatim
        if num_patches_list and isinstance(messages[0]["content"], str):
            placeholder = P.image_placeholder(num_patches_list[0], num_image_token)
            expanded = [{**messages[0], "content": messages[0]["content"].replace("<image>", placeholder)}]
            expanded += messages[1:]
            assert (
                tokenizer.apply_chat_template(expanded, add_generation_prompt=True, tokenize=False)
                == expected
            )
    # without add_generation_prompt: no assistant header
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == P.build_prompt("Hi", [], num_image_token).removesuffix("<|im_start|>assistant\n")


def test_chat_template_tiny_tokenizer(tokenizer, config):
    assert tokenizer.chat_template == P.CHAT_TEMPLATE
    assert_template_is_chat_prompt(tokenizer, config.num_image_token)


def test_chat_template_release_tokenizer(folder, tmp_path):
    """The release's tokenizer files (its tokenizer_config.json carries Qwen's stock template) next to
    the folder's chat_template.jinja: ours wins, and renders chat()'s prompt with 256 tokens a tile."""
    if not (REFERENCE / "vocab.json").is_file():
        pytest.skip(
            f"the release tokenizer (vocab.json, merges.txt, tokenizer_config.json) is absent: {REFERENCE}"
        )
    from transformers import AutoTokenizer

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / name, tmp_path / name)
    assert "You are Qwen" in json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    shutil.copyfile(folder / "chat_template.jinja", tmp_path / "chat_template.jinja")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True, trust_remote_code=False)
    assert tokenizer.chat_template == P.CHAT_TEMPLATE
    assert_template_is_chat_prompt(tokenizer, 256)
    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = P.expand_image_markers(rendered, [7], 256)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(P.build_prompt(QUESTION, [7], 256))["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|vision_pad|>")) == 7 * 256


# --------------------------------------------------------------------------------------
# remote code: a Python without nvlm-port
# --------------------------------------------------------------------------------------

_REMOTE = textwrap.dedent(
    """
    import importlib.util, sys
    sys.path[:] = [p for p in sys.path if p not in ("", ".", REPO)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in type(f).__module__]
    for name in ("modeling", "converter", "mappings"):
        assert importlib.util.find_spec(name) is None, name + " is importable"
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.utils import is_torchvision_available
    image = Image.open(FOLDER + "/probe.png")
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = dict(processor(images=image, text=prompt, return_tensors="pt"))
    kwargs = {"backend": "pil"} if is_torchvision_available() else {}
    image_processor = AutoImageProcessor.from_pretrained(FOLDER, **kwargs)
    inputs["image_processor"] = image_processor(image, return_tensors="pt")["pixel_values"]
    torch.save(inputs, FOLDER + "/remote_processor.pt")
    """
)


def test_processors_load_as_remote_code_without_nvlm_port(folder, processor, tmp_path):
    image = noise_image((170, 90), 9)
    image.save(folder / "probe.png")
    run_without_nvlm_port(_REMOTE, folder, tmp_path)
    remote = torch.load(folder / "remote_processor.pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    local = processor(images=Image.open(folder / "probe.png"), text=prompt)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(remote[key], local[key]), key
    assert torch.equal(remote["image_processor"], local["pixel_values"])
