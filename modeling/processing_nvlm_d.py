"""Image preprocessing and prompt building for NVLM-D.

This file is shipped as remote code inside converted model folders, so it stays
self-contained: only the standard library, numpy, torch, PIL and transformers are imported.

Three parts:
1. images -> pixel tensors: InternVL-style dynamic tiling into square tiles plus a
   thumbnail, bicubic resizing and ImageNet normalisation;
2. text -> prompt string: the published chatml chat format (MPT separator style, no
   newline after ``<|im_end|>``) with each ``<image>`` marker expanded into tile tags and
   image-context tokens;
3. the same in transformers' own terms, for a converted folder: `image_processor_config`
   (the preprocessor_config.json under which `AutoImageProcessor` gives transformers'
   `GotOcr2ImageProcessor`, whose tiles equal part 1's), `CHAT_TEMPLATE` (chat()'s prompt as
   a chat template) and `NVLMProcessor` (what `AutoProcessor` gives: image + text in,
   input_ids + pixel_values out, placeholders expanded as chat() expands them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

# --------------------------------------------------------------------------------------
# 1. Images
# --------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BICUBIC = Image.Resampling.BICUBIC


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_num <= cols*rows <= max_num.

    Sorted by tile count; equal counts are ordered by cols so the result (and hence the
    tie-breaking in `find_closest_aspect_ratio`) never depends on set iteration order.
    """
    grids = [
        (cols, rows)
        for cols in range(1, max_num + 1)
        for rows in range(1, max_num + 1)
        if min_num <= cols * rows <= max_num
    ]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def find_closest_aspect_ratio(
    aspect_ratio: float,
    grids: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """Pick the grid whose cols/rows is closest to the image's aspect ratio.

    On an exact tie a later (larger) grid replaces the current choice only when the image
    has more than half the pixels that grid would hold, so small images are not blown up
    into many tiles.
    """
    best_grid = (1, 1)
    best_diff = float("inf")
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best_grid = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 6,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split an image into image_size tiles (row-major) plus an optional thumbnail."""
    width, height = image.size
    grids = candidate_grids(min_num, max_num)
    cols, rows = find_closest_aspect_ratio(width / height, grids, width, height, image_size)

    resized = image.resize((image_size * cols, image_size * rows), BICUBIC)
    tiles = []
    for row in range(rows):
        for col in range(cols):
            left, top = col * image_size, row * image_size
            tiles.append(resized.crop((left, top, left + image_size, top + image_size)))

    # A one-tile image already is the whole picture: a thumbnail would only repeat it.
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), BICUBIC))
    return tiles


def to_tensor(
    tile: Image.Image,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """One tile -> normalised float32 tensor [3, image_size, image_size]."""
    tile = tile.convert("RGB")
    if tile.size != (image_size, image_size):
        tile = tile.resize((image_size, image_size), BICUBIC)
    # Scale and normalise in float32, matching torchvision's ToTensor + Normalize.
    array = np.asarray(tile, dtype=np.float32) / np.float32(255.0)
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """Accept a PIL image or a path; always hand back RGB."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")


def image_to_pixel_values(
    image: Image.Image | str | Path,
    image_size: int = 448,
    max_num: int = 6,
    use_thumbnail: bool = True,
    min_num: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Image (or path) -> float32 tensor [n_tiles, 3, image_size, image_size]."""
    tiles = dynamic_preprocess(
        load_image(image),
        min_num=min_num,
        max_num=max_num,
        image_size=image_size,
        use_thumbnail=use_thumbnail,
    )
    return torch.stack([to_tensor(tile, image_size, mean, std) for tile in tiles])


class NVLMImageProcessor:
    """Holds the preprocessing settings; reads and writes preprocessor_config.json."""

    def __init__(
        self,
        image_size: int = 448,
        max_num: int = 6,
        min_num: int = 1,
        use_thumbnail: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        self.image_size = int(image_size)
        self.max_num = int(max_num)
        self.min_num = int(min_num)
        self.use_thumbnail = bool(use_thumbnail)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)

    def __call__(self, images) -> dict:
        """One image or a list -> dict(pixel_values=[sum tiles, 3, S, S], num_patches_list=[...])."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        per_image = [
            image_to_pixel_values(
                image,
                image_size=self.image_size,
                max_num=self.max_num,
                use_thumbnail=self.use_thumbnail,
                min_num=self.min_num,
                mean=self.image_mean,
                std=self.image_std,
            )
            for image in images
        ]
        if not per_image:
            raise ValueError("NVLMImageProcessor needs at least one image")
        return {
            "pixel_values": torch.cat(per_image),
            "num_patches_list": [t.shape[0] for t in per_image],
        }

    @classmethod
    def from_dict(cls, config: dict) -> NVLMImageProcessor:
        """Build from preprocessor_config.json fields (size/crop_size may be int or dict)."""
        image_size = _size_value(config.get("crop_size", config.get("size", 448)))
        max_num = config.get("max_dynamic_patch", config.get("max_patches", 6))
        min_num = config.get("min_dynamic_patch", config.get("min_patches", 1))
        resample = config.get("resample", 3)
        if resample != 3:
            raise ValueError(f"only bicubic resampling (3) is supported, got {resample!r}")
        return cls(
            image_size=image_size,
            max_num=max_num,
            min_num=min_num,
            use_thumbnail=config.get("use_thumbnail", True),
            image_mean=config.get("image_mean", IMAGENET_MEAN),
            image_std=config.get("image_std", IMAGENET_STD),
        )

    def to_dict(self) -> dict:
        """preprocessor_config.json: the fields under which transformers' AutoImageProcessor gives
        GotOcr2ImageProcessor tiling exactly as this class does, plus our tiling settings.

        Without a thumbnail (no GotOcr2 form) the published release's CLIP-style fields are written."""
        ours = {
            "max_dynamic_patch": self.max_num,
            "min_dynamic_patch": self.min_num,
            "use_thumbnail": self.use_thumbnail,
        }
        if self.use_thumbnail:
            return {
                **image_processor_config(
                    self.image_size, self.max_num, self.min_num, True, self.image_mean, self.image_std
                ),
                **ours,
            }
        return {
            "crop_size": self.image_size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": 3,
            "size": self.image_size,
            **ours,
        }


def _size_value(size) -> int:
    """HF configs store a size as an int or as {"height": h, "width": w} / {"shortest_edge": s}."""
    if isinstance(size, dict):
        values = {size[k] for k in ("height", "width", "shortest_edge") if k in size}
        if len(values) != 1:
            raise ValueError(f"expected one square size, got {size!r}")
        return int(values.pop())
    return int(size)


# --------------------------------------------------------------------------------------
# 2. Prompts
# --------------------------------------------------------------------------------------

IMG_CONTEXT_TOKEN = "<|vision_pad|>"
IMG_START_TOKEN = "<|vision_start|>"
IMG_END_TOKEN = "<|vision_end|>"
DEFAULT_SYSTEM_MESSAGE = "Answer the questions."

IMAGE_MARKER = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


def tile_tags(num_tiles: int) -> list[str]:
    """Tags of an image's tiles: <tile_1>..<tile_{n-1}> then <tile_global_thumbnail>.

    A single tile (no thumbnail) is still tagged <tile_global_thumbnail>, so it keeps its
    image tokens.
    """
    if num_tiles < 1:
        raise ValueError(f"an image has at least one tile, got {num_tiles}")
    return [f"<tile_{i}>" for i in range(1, num_tiles)] + ["<tile_global_thumbnail>"]


def image_placeholder(num_tiles: int, num_image_token: int, context_token: str = IMG_CONTEXT_TOKEN) -> str:
    """<Image>, then per tile its tag and num_image_token context tokens, then </Image>."""
    body = "".join(tag + context_token * num_image_token for tag in tile_tags(num_tiles))
    return f"<Image>{body}</Image>"


def build_conversation(
    question: str,
    history: Sequence[tuple[str, str]] = (),
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
) -> str:
    """chatml turns, MPT style: every turn ends in <|im_end|> with no newline after it."""
    parts = []
    if system_message:
        parts.append(f"{IM_START}system\n{system_message}{IM_END}")
    for old_question, old_answer in history:
        parts.append(f"{IM_START}user\n{old_question}{IM_END}")
        parts.append(f"{IM_START}assistant\n{old_answer}{IM_END}")
    parts.append(f"{IM_START}user\n{question}{IM_END}")
    parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def build_prompt(
    question: str,
    num_patches_list: Sequence[int],
    num_image_token: int,
    history: Sequence[tuple[str, str]] = (),
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
    context_token: str = IMG_CONTEXT_TOKEN,
) -> str:
    """The published chat() prompt, with every <image> marker expanded in order."""
    num_patches_list = list(num_patches_list)
    # Like the published chat(): a lone first question with images gets the marker in front.
    if num_patches_list and not history and IMAGE_MARKER not in question:
        question = f"{IMAGE_MARKER}\n{question}"
    query = build_conversation(question, history, system_message)

    found = query.count(IMAGE_MARKER)
    if found != len(num_patches_list):
        raise ValueError(
            f"prompt has {found} '{IMAGE_MARKER}' marker(s) but {len(num_patches_list)} image(s) were given"
        )
    for num_tiles in num_patches_list:
        query = query.replace(IMAGE_MARKER, image_placeholder(num_tiles, num_image_token, context_token), 1)
    return query


def split_response(text: str, sep: str = IM_END) -> str:
    """The generated answer: everything before the first separator, stripped."""
    return text.split(sep, 1)[0].strip()


# --------------------------------------------------------------------------------------
# 3. transformers' own pieces: AutoImageProcessor, chat template, AutoProcessor
# --------------------------------------------------------------------------------------

# transformers' processor whose tiling is InternVL's dynamic_preprocess (the same grid rule, tie
# rule, row-major crops and thumbnail); with the keys below its tiles equal image_to_pixel_values'.
GOT_OCR2_IMAGE_PROCESSOR = "GotOcr2ImageProcessor"


def image_processor_config(
    image_size: int = 448,
    max_num: int = 6,
    min_num: int = 1,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict:
    """preprocessor_config.json fields under which AutoImageProcessor gives GotOcr2ImageProcessor
    tiling as `image_to_pixel_values` does (GotOcr2 always adds the thumbnail to a multi-tile image,
    so use_thumbnail=False has no GotOcr2 form)."""
    if not use_thumbnail:
        raise ValueError("GotOcr2ImageProcessor always adds a thumbnail: no config for use_thumbnail=False")
    return {
        "image_processor_type": GOT_OCR2_IMAGE_PROCESSOR,
        "crop_to_patches": True,
        "min_patches": int(min_num),
        "max_patches": int(max_num),
        "size": {"height": int(image_size), "width": int(image_size)},
        "do_resize": True,
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in mean],
        "image_std": [float(x) for x in std],
        "do_convert_rgb": True,
    }


# chat()'s prompt (build_prompt) as a chat template: chatml turns, MPT style (no newline after
# <|im_end|>), the system turn "Answer the questions." unless the conversation brings its own (an
# empty one drops it). Content is a string, or a list of {"type": "text"} / {"type": "image"}
# parts; an image part is the "<image>\n" marker chat() puts before a lone first question, which
# NVLMProcessor expands into <Image><tile_k>...</Image>.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM_MESSAGE + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- if system -%}{{- '<|im_start|>system\n' + system + '<|im_end|>' -}}{%- endif -%}"
    "{%- for message in turns -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + render(message['content']) + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def expand_image_markers(
    text: str, num_patches_list: Sequence[int], num_image_token: int, context_token: str = IMG_CONTEXT_TOKEN
) -> str:
    """Replace the <image> markers of `text`, in order, by each image's tile placeholder."""
    num_patches_list = list(num_patches_list)
    found = text.count(IMAGE_MARKER)
    if found != len(num_patches_list):
        raise ValueError(
            f"text has {found} '{IMAGE_MARKER}' marker(s) but {len(num_patches_list)} image(s) were given"
        )
    for num_tiles in num_patches_list:
        text = text.replace(IMAGE_MARKER, image_placeholder(num_tiles, num_image_token, context_token), 1)
    return text


def _add_marker(text: str) -> str:
    """chat()'s rule for one image and a question without a marker: "<image>\n" before the question
    (in a chatml prompt, the content of its only user turn)."""
    user = f"{IM_START}user\n"
    if IM_START not in text:
        return f"{IMAGE_MARKER}\n{text}"
    if text.count(user) != 1:
        raise ValueError(f"one image, no '{IMAGE_MARKER}' marker and several user turns: place the marker")
    return text.replace(user, f"{user}{IMAGE_MARKER}\n", 1)


def pil_image_processor(image_processor):
    """The PIL form of a transformers image processor: GotOcr2's tiles equal ours with PIL's bicubic
    resize, not with torchvision's (transformers 5 takes the torchvision backend wherever torchvision
    is installed; transformers 4 calls it ...Fast)."""
    name = type(image_processor).__name__
    if name.endswith("Fast"):
        target = name[: -len("Fast")]
    elif getattr(image_processor, "backend", "pil") != "pil":
        target = name + "Pil"
    else:
        return image_processor
    pil_class = getattr(transformers, target, None)
    if pil_class is None:
        return image_processor
    dropped = ("image_processor_type", "backend", "auto_map", "processor_class", "_processor_class")
    return pil_class(**{k: v for k, v in image_processor.to_dict().items() if k not in dropped})


class NVLMProcessor(ProcessorMixin):
    """Image processor + tokenizer, as `AutoProcessor.from_pretrained(folder, trust_remote_code=True)`
    gives them for a converted folder.

        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        model.generate(**inputs, max_new_tokens=...)

    Each <image> marker of the text becomes <Image>, <tile_k> tags and `num_image_token`
    <|vision_pad|> tokens per tile, </Image>, exactly as chat() builds its prompt; pixel_values are
    the image processor's tiles of all images, in order (its PIL backend: see pil_image_processor).
    One image and a text with no marker: the marker goes before the question (the only user turn),
    as chat() puts it.
    """

    if int(transformers.__version__.split(".")[0]) < 5:  # transformers 4 finds its parts by these
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"
    valid_kwargs = ["chat_template", "num_image_token", "image_token"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_token: int = 256,
        image_token: str = IMG_CONTEXT_TOKEN,
        **kwargs,
    ):
        self.num_image_token = int(num_image_token)
        self.image_token = image_token
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        if image_processor is not None:
            image_processor = pil_image_processor(image_processor)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, images=None, text=None, videos=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """images: a PIL image (or path) or a list of them, in marker order, for all texts together;
        text: a string or a list of strings with one <image> marker per image. Other keyword
        arguments (padding, ...) go to the tokenizer."""
        if videos is not None:
            raise ValueError("NVLM-D takes no videos")
        if text is None:
            raise ValueError("NVLMProcessor needs text (the prompt, with an <image> marker per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        else:  # [[img, ...], ...] per text -> flat, in marker order
            images = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        for key in ("images_kwargs", "text_kwargs", "common_kwargs", "videos_kwargs", "audio_kwargs"):
            kwargs.pop(key, None)  # what ProcessorMixin.apply_chat_template may pass along
        kwargs.pop("add_special_tokens", None)  # the prompt already holds its special tokens

        data = {}
        num_patches_list: list[int] = []
        if images:
            # The release's load_image: .convert("RGB") drops alpha (transformers would blend it on white).
            pixels = self.image_processor([load_image(im) for im in images], return_tensors="pt")
            data["pixel_values"] = pixels["pixel_values"]
            num_patches_list = [int(n) for n in pixels["num_patches"]]
            if len(texts) == 1 and len(images) == 1 and IMAGE_MARKER not in texts[0]:
                texts = [_add_marker(texts[0])]
        markers = [t.count(IMAGE_MARKER) for t in texts]
        if sum(markers) != len(num_patches_list):
            raise ValueError(
                f"text has {sum(markers)} '{IMAGE_MARKER}' marker(s) but {len(num_patches_list)} image(s)"
            )
        expanded, start = [], 0
        for t, count in zip(texts, markers):
            expanded.append(
                expand_image_markers(
                    t, num_patches_list[start : start + count], self.num_image_token, self.image_token
                )
            )
            start += count
        encoded = self.tokenizer(expanded, return_tensors=return_tensors, add_special_tokens=False, **kwargs)
        return BatchFeature(data={**encoded, **data}, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
