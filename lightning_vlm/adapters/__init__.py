"""Adapters between image features and a text model, all (B, N, D_in) -> (B, M, D_out) (plain PyTorch).

The `Adapter` ones are interchangeable by YAML wherever image features meet text (LLaVA's `adapter`, BLIP-2's
`projection`, CoCa's poolers, Flamingo's `resampler`): identity, linear, MLP, Perceiver resampler, pixel shuffle,
adaptive average pooling, attentional pooling, Honeybee's C-Abstractor and D-Abstractor, and BLIP-2's Q-Former
reading the image with its queries alone (`QFormerAdapter`). The `QFormer` itself is BLIP-2's, text branch included.
"""

from lightning_vlm.adapters.attention_pool import AttentionPooler
from lightning_vlm.adapters.base import Adapter
from lightning_vlm.adapters.c_abstractor import CAbstractor
from lightning_vlm.adapters.d_abstractor import DAbstractor
from lightning_vlm.adapters.perceiver import PerceiverResampler
from lightning_vlm.adapters.projection import MLP, Identity, Linear
from lightning_vlm.adapters.qformer import QFormer, QFormerAdapter, QFormerOutput, attention_mask
from lightning_vlm.adapters.spatial import AveragePool, PixelShuffle

__all__ = ["MLP", "Adapter", "AttentionPooler", "AveragePool", "CAbstractor", "DAbstractor", "Identity", "Linear",
           "PerceiverResampler", "PixelShuffle", "QFormer", "QFormerAdapter", "QFormerOutput", "attention_mask"]
