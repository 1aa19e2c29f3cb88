"""How a scene is drawn: background, object sizes, colour jitter, blur and noise.

The default `Style` is the one look of train/val/test/compositional; the style-shift split samples others, never
used in training, to measure generalisation across drawing styles while every label stays true.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass

from lightning_vlm.data.synthetic.scenes import COLORS, SIZES

RGB = tuple[int, int, int]

BACKGROUND: RGB = (20, 20, 20)  # the training look: flat, near black
# Dark shades only, so every object colour (and the grey of written words) keeps its contrast.
SHIFTED_BACKGROUNDS: dict[str, RGB] = {
    "navy": (18, 26, 68),
    "slate": (48, 52, 60),
    "brown": (58, 38, 26),
    "teal": (14, 48, 50),
    "grey": (70, 70, 70),
}
TEXTURES: tuple[str, ...] = ("flat", "gradient", "checker", "noise")
SHIFTED_SIZES: dict[str, tuple[float, float]] = {"small": (0.12, 0.14), "large": (0.30, 0.34)}  # never 0.16 / 0.28
HUE_JITTER = 0.015  # at most, in turns of the colour wheel: small enough that the nearest named colour is unchanged
VALUE_JITTER = 0.08  # at most, relative change of brightness
MAX_BLUR = 0.6  # Gaussian blur radius, pixels
MAX_NOISE = 8.0  # amplitude of uniform pixel noise, in 0-255 levels


@dataclass(frozen=True)
class Style:
    """One drawing style. `seed` draws what varies within an image: each object's jitter and the pixel noise."""

    texture: str = "flat"  # flat | gradient (top to bottom) | checker | noise
    background: RGB = BACKGROUND
    background_to: RGB = BACKGROUND  # the gradient's bottom, the checker's other cells
    small: float = SIZES["small"]
    large: float = SIZES["large"]
    hue_jitter: float = 0.0
    value_jitter: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    seed: int = 0

    @property
    def sizes(self) -> dict[str, float]:
        """Object side per size name, as a fraction of the image (the names, and their order, stay SIZES')."""
        return {"small": self.small, "large": self.large}


DEFAULT_STYLE = Style()


def sample_style(rng: random.Random) -> Style:
    """A style never used in training: another background, other sizes, per-object jitter, mild blur and noise."""
    first, second = rng.sample(list(SHIFTED_BACKGROUNDS.values()), 2)
    return Style(
        texture=rng.choice(TEXTURES),
        background=first,
        background_to=second,
        small=rng.uniform(*SHIFTED_SIZES["small"]),
        large=rng.uniform(*SHIFTED_SIZES["large"]),
        hue_jitter=HUE_JITTER,
        value_jitter=VALUE_JITTER,
        blur=rng.uniform(0.0, MAX_BLUR),
        noise=rng.uniform(0.0, MAX_NOISE),
        seed=rng.getrandbits(32),
    )


def jitter(rgb: RGB, hue_shift: float, value_scale: float) -> RGB:
    """`rgb` turned by `hue_shift` turns around the colour wheel and its brightness scaled by `value_scale`."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    shifted = colorsys.hsv_to_rgb((h + hue_shift) % 1.0, s, min(1.0, v * value_scale))
    return tuple(round(c * 255) for c in shifted)  # type: ignore[return-value]


def nearest_color(rgb: tuple[int, ...]) -> str:
    """The colour name whose RGB value is closest (Euclidean) to `rgb`."""
    return min(COLORS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLORS[name], rgb)))
