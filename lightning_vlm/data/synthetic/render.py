"""Draw a scene with PIL in a `Style` and encode it as JPEG.

Shapes are drawn at twice the resolution and box-filtered down: cheap anti-aliasing that keeps small shapes
recognisable at 64 pixels.
"""

from __future__ import annotations

import io
import math
import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lightning_vlm.data.synthetic.scenes import COLORS, Box, Scene
from lightning_vlm.data.synthetic.style import DEFAULT_STYLE, Style, jitter

TEXT_COLOR = (165, 165, 165)  # grey, so a word is never mistaken for a white object
_SUPERSAMPLE = 2
_FONT_FILL = 0.9  # font size relative to the word box height (glyphs span ~1.1 em from ascender to descender)
_CHECKER_CELLS = 8  # cells per side of a checker background
_TEXTURE_NOISE = 24  # amplitude of a noise background, in 0-255 levels


def _star(points: int = 5, inner: float = 0.4) -> list[tuple[float, float]]:
    """Vertices of a star in the unit square, first point up."""
    radii = [0.5, 0.5 * inner] * points
    angles = [math.pi * k / points - math.pi / 2 for k in range(2 * points)]
    return [(0.5 + r * math.cos(a), 0.5 + r * math.sin(a)) for r, a in zip(radii, angles)]


_T = 1 / 3
# Polygons in the unit square; the circle is drawn as an ellipse.
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "star": _star(),
    "cross": [(_T, 0), (2 * _T, 0), (2 * _T, _T), (1, _T), (1, 2 * _T), (2 * _T, 2 * _T),
              (2 * _T, 1), (_T, 1), (_T, 2 * _T), (0, 2 * _T), (0, _T), (_T, _T)],
}  # fmt: skip


def render(scene: Scene, style: Style = DEFAULT_STYLE) -> Image.Image:
    """The scene as an RGB image of `scene.image_size` pixels square, drawn in `style` (by default the training
    look: flat background, exact colours, no blur or noise)."""
    size = scene.image_size * _SUPERSAMPLE
    rng = random.Random(style.seed)
    image = _background(style, size, rng)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = _scaled(obj.box)
        fill = COLORS[obj.color]
        if style.hue_jitter or style.value_jitter:
            hue, value = rng.uniform(-1, 1) * style.hue_jitter, 1 + rng.uniform(-1, 1) * style.value_jitter
            fill = jitter(fill, hue, value)
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in POLYGONS[obj.shape]], fill=fill)
    if scene.word is not None and scene.word_box is not None:
        x0, y0, x1, y1 = _scaled(scene.word_box)
        font = _font(round((y1 - y0) * _FONT_FILL))
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), scene.word, fill=TEXT_COLOR, font=font, anchor="mm")
    image = image.reduce(_SUPERSAMPLE)
    if style.blur:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    if style.noise:
        image = _add_noise(image, style.noise, rng, per_channel=True)
    return image


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes without chroma subsampling, which would smear the colours of small shapes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _background(style: Style, size: int, rng: random.Random) -> Image.Image:
    """A `size`-pixel square canvas filled with the style's background texture."""
    if style.texture == "flat":
        return Image.new("RGB", (size, size), style.background)
    top, bottom = np.array(style.background, dtype=np.float64), np.array(style.background_to, dtype=np.float64)
    if style.texture == "gradient":
        rows = top + np.linspace(0.0, 1.0, size)[:, None] * (bottom - top)
        return Image.fromarray(np.broadcast_to(rows[:, None], (size, size, 3)).round().astype(np.uint8))
    if style.texture == "checker":
        cell = np.arange(size) * _CHECKER_CELLS // size
        odd = (cell[:, None] + cell[None, :]) % 2 == 1
        return Image.fromarray(np.where(odd[..., None], bottom, top).astype(np.uint8))
    if style.texture == "noise":
        return _add_noise(Image.new("RGB", (size, size), style.background), _TEXTURE_NOISE, rng, per_channel=False)
    raise ValueError(f"unknown background texture {style.texture!r}")


def _add_noise(image: Image.Image, amplitude: float, rng: random.Random, per_channel: bool) -> Image.Image:
    """`image` plus uniform noise in [-amplitude, amplitude] levels (grey noise unless `per_channel`), drawn from
    `rng` so that a seed always gives the same pixels."""
    w, h = image.size
    shape = (h, w, 3) if per_channel else (h, w, 1)
    uniform = np.frombuffer(rng.randbytes(math.prod(shape)), dtype=np.uint8).reshape(shape) / 255.0
    noisy = np.asarray(image, dtype=np.float64) + (2.0 * uniform - 1.0) * amplitude
    return Image.fromarray(noisy.round().clip(0, 255).astype(np.uint8))


def _scaled(box: Box) -> Box:
    """A pixel box (end exclusive) as inclusive coordinates on the supersampled canvas."""
    x0, y0, x1, y1 = box
    s = _SUPERSAMPLE
    return x0 * s, y0 * s, x1 * s - 1, y1 * s - 1


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font, so rendering does not depend on the system's fonts."""
    return ImageFont.load_default(size=size)
