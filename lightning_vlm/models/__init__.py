"""Models: compositions of encoders, adapters and heads, one file per family (plain nn.Module). Each returns what
it computed (a dataclass of named outputs); a loss in losses/ turns that into named terms."""

from lightning_vlm.models.blip2 import BLIP2, BLIP2Output
from lightning_vlm.models.coca import CoCa, CoCaOutput
from lightning_vlm.models.contrastive import (
    ContrastiveHeads,
    ContrastiveOutput,
    DualEncoder,
    Llip,
    LlipOutput,
    MixtureCrossAttention,
)
from lightning_vlm.models.flamingo import Flamingo
from lightning_vlm.models.flava import FLAVA
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.models.masked import MaskedModelingOutput
from lightning_vlm.models.maskvlm import MaskVLM
from lightning_vlm.models.prefix_lm import PrefixLM

__all__ = ["BLIP2", "FLAVA", "BLIP2Output", "CoCa", "CoCaOutput", "ContrastiveHeads", "ContrastiveOutput",
           "DualEncoder", "Flamingo", "LLaVA", "Llip", "LlipOutput", "MaskVLM", "MaskedModelingOutput",
           "MixtureCrossAttention", "PrefixLM"]
