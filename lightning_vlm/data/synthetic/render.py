"""Draw a scene with PIL and encode it as JPEG.

Shapes are drawn at twice the resolution and box-filtered down: cheap anti-aliasing that keeps small shapes
recognisable at 64 pixels.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from lightning_vlm.data.synthetic.scenes import COLORS, Box, Scene

BACKGROUND = (20, 20, 20)
TEXT_COLOR = (165, 165, 165)  # grey, so a word is never mistaken for a white object
_SUPERSAMPLE = 2
_FONT_FILL = 0.9  # font size relative to the word box height (glyphs span ~1.1 em from ascender to descender)


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


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.image_size` pixels square."""
    size = scene.image_size * _SUPERSAMPLE
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = _scaled(obj.box)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in POLYGONS[obj.shape]], fill=fill)
    if scene.word is not None and scene.word_box is not None:
        x0, y0, x1, y1 = _scaled(scene.word_box)
        font = _font(round((y1 - y0) * _FONT_FILL))
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), scene.word, fill=TEXT_COLOR, font=font, anchor="mm")
    return image.reduce(_SUPERSAMPLE)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes without chroma subsampling, which would smear the colours of small shapes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _scaled(box: Box) -> Box:
    """A pixel box (end exclusive) as inclusive coordinates on the supersampled canvas."""
    x0, y0, x1, y1 = box
    s = _SUPERSAMPLE
    return x0 * s, y0 * s, x1 * s - 1, y1 * s - 1


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font, so rendering does not depend on the system's fonts."""
    return ImageFont.load_default(size=size)
