"""Image transforms that keep text and boxes true to the image.

A horizontal flip swaps "left" and "right" in every text field and mirrors the boxes; colour jitter is
absent on purpose, because colour is a label in the synthetic benchmark.
"""

from __future__ import annotations

import contextlib
import random
import re
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from lightning_vlm.data.reading import RawSample

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}

# The usual statistics of vision backbones; `ImageTransform` accepts any pair.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def swap_left_right(text: str) -> str:
    """Mirror the spatial words of a text: what was left of something is right of it after a flip."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], text)


def _mirror_text(value):
    if isinstance(value, str):
        return swap_left_right(value)
    if isinstance(value, list):
        return [_mirror_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _mirror_text(v) for k, v in value.items()}
    return value


def hflip_sample(sample: RawSample) -> RawSample:
    """The sample seen in a mirror: image flipped, texts' left/right swapped, boxes mirrored."""
    width = sample.image.width
    info = _mirror_text(sample.info)  # rebuilds every dict and list: the original is left untouched
    for obj in info.get("objects", []):
        obj["box"] = mirror_box(obj["box"], width)
    image = sample.image.transpose(0)  # PIL.Image.Transpose.FLIP_LEFT_RIGHT
    return RawSample(sample.key, image, swap_left_right(sample.caption), info)


def mirror_box(box: list[float], width: int) -> list[float]:
    x0, y0, x1, y1 = box
    return [width - x1, y0, width - x0, y1]


def aspect_size(width: int, height: int, longest: int, multiple: int = 1) -> tuple[int, int]:
    """(height, width) of an image resized so its longer side is `longest` with its aspect ratio kept, each side
    rounded to a multiple of `multiple` (a patch size) and at least one multiple."""
    scale = longest / max(width, height)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


@dataclass
class ImageTransform:
    """Resize (or random-resized-crop) and normalise; boxes in `info['objects']` follow the geometry.

    `hflip` is the flip probability; samples with written text are never flipped (mirrored letters would
    no longer read as their label). `crop_scale`, when set, turns on a random resized crop for training. `blind`
    zeroes every normalised image (the dataset's mean colour), the control that shows a model's language priors.
    `keep_aspect` resizes to `aspect_size` instead of a square: the longer side `image_size`, both sides multiples
    of `size_multiple` (native resolution: Fuyu, Pixtral, LLaVA-NeXT's AnyRes).
    """

    image_size: int = 64
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    hflip: float = 0.0
    crop_scale: tuple[float, float] | None = None
    blind: bool = False
    keep_aspect: bool = False
    size_multiple: int = 1

    def __post_init__(self) -> None:
        if self.keep_aspect and self.crop_scale:
            raise ValueError("keep_aspect and crop_scale exclude each other: a random resized crop is square")
        size = (self.image_size, self.image_size)
        resize = v2.RandomResizedCrop(size, scale=self.crop_scale) if self.crop_scale else v2.Resize(size)
        self._geometry = v2.Compose([resize, v2.ClampBoundingBoxes()])
        self._to_tensor = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def __call__(self, sample: RawSample, rng: random.Random) -> tuple[torch.Tensor, RawSample, bool]:
        """(pixel_values, sample with boxes in the output geometry, whether it was flipped)."""
        flipped = self.hflip > 0 and not sample.info.get("word") and rng.random() < self.hflip
        if flipped:
            sample = hflip_sample(sample)
        size = self._size(*sample.image.size)
        if not self.crop_scale and sample.image.size == size[::-1]:
            return self._pixels(v2.functional.pil_to_tensor(sample.image)), sample, flipped
        objects = sample.info.get("objects", [])
        image = tv_tensors.Image(v2.functional.pil_to_tensor(sample.image))
        boxes = tv_tensors.BoundingBoxes(
            [o["box"] for o in objects] or torch.zeros(0, 4), format="XYXY", canvas_size=image.shape[-2:]
        )
        geometry = v2.Compose([v2.Resize(size), v2.ClampBoundingBoxes()]) if self.keep_aspect else self._geometry
        with _torch_seeded(rng) if self.crop_scale else contextlib.nullcontext():
            image, boxes = geometry(image, boxes)
        if objects:
            info = dict(sample.info, objects=[dict(o, box=b.tolist()) for o, b in zip(objects, boxes)])
            sample = RawSample(sample.key, sample.image, sample.caption, info)
        return self._pixels(image), sample, flipped

    def _size(self, width: int, height: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        if self.keep_aspect:
            return aspect_size(width, height, self.image_size, self.size_multiple)
        return self.image_size, self.image_size

    def _pixels(self, image: torch.Tensor) -> torch.Tensor:
        pixels = self._to_tensor(image)
        return torch.zeros_like(pixels) if self.blind else pixels


@contextlib.contextmanager
def _torch_seeded(rng: random.Random):
    """torchvision draws from torch's global RNG; seed it from the stream's own RNG so crops are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(62))
        yield
