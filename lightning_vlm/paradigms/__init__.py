"""Paradigms: one LightningModule per family, each a model plus a loss on the shared base (`VLMParadigm`)."""

from lightning_vlm.paradigms.base import VLMParadigm
from lightning_vlm.paradigms.blip2 import BLIP2Paradigm
from lightning_vlm.paradigms.coca import CoCaParadigm
from lightning_vlm.paradigms.contrastive import Contrastive
from lightning_vlm.paradigms.generative import ImageToText
from lightning_vlm.paradigms.masked import MaskedPretraining

__all__ = ["BLIP2Paradigm", "CoCaParadigm", "Contrastive", "ImageToText", "MaskedPretraining", "VLMParadigm"]
