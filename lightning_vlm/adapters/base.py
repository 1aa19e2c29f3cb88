"""The adapter contract: (B, N, D_in) image features -> (B, M, D_out) tokens for a text model, interchangeable by
YAML, sized by the model that holds them (widths are derived from the encoders, never written in a recipe)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from torch import Tensor, nn


class Adapter(nn.Module, ABC):
    """A recipe names the adapter and its own settings (``class_path: lightning_vlm.adapters.PerceiverResampler``,
    ``init_args: {num_latents: 16}``); the model holding it calls `build` with the widths of its encoders, which
    creates the layers. `forward` maps (B, N, D_in) to (B, M, D_out) with M = `num_output_tokens(N)`."""

    def __init__(self) -> None:
        super().__init__()
        self.width_in: int | None = None
        self.width_out: int | None = None

    def build(self, width_in: int, width_out: int) -> Adapter:
        """Create the layers for these widths (once); returns the adapter."""
        if self.width_in is not None:
            raise RuntimeError(f"{type(self).__name__} is already built for {self.width_in} -> {self.width_out}")
        self.width_in, self.width_out = width_in, width_out
        self._build(width_in, width_out)
        return self

    @abstractmethod
    def _build(self, width_in: int, width_out: int) -> None:
        """Create the layers."""

    @abstractmethod
    def num_output_tokens(self, num_tokens: int) -> int:
        """M, the number of tokens out for N tokens in (the image-token count a language model reads)."""

    def __call__(self, tokens: Tensor, *context: Tensor | None) -> Tensor:
        """The image tokens, and whatever else an adapter's forward reads beside them (an instruction)."""
        if self.width_in is None:
            raise RuntimeError(f"{type(self).__name__} is used before build(width_in, width_out)")
        return super().__call__(tokens, *context)


def square_grid(num_tokens: int) -> int:
    """The side of the square grid of `num_tokens` patch tokens; a clear error when they do not form one."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid: spatial adapters need patch tokens only")
    return side
