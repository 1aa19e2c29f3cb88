"""Paradigm-agnostic evaluation of image-text scoring models: retrieval, zero-shot classification, binding."""

from lightning_vlm.eval.binding import binding_accuracy
from lightning_vlm.eval.retrieval import retrieval_recall
from lightning_vlm.eval.suite import ContrastiveEvaluator
from lightning_vlm.eval.zero_shot import caption_templates, zero_shot_accuracy

__all__ = [
    "ContrastiveEvaluator",
    "binding_accuracy",
    "caption_templates",
    "retrieval_recall",
    "zero_shot_accuracy",
]
