"""Paradigm-agnostic evaluation of image-text scoring models: retrieval, zero-shot classification, binding."""

from lightning_vlm.eval.binding import binding_accuracy
from lightning_vlm.eval.retrieval import retrieval_recall
from lightning_vlm.eval.suite import ContrastiveEvaluator
from lightning_vlm.eval.zero_shot import COLOR_TEMPLATES, SHAPE_TEMPLATES, zero_shot_accuracy

__all__ = [
    "COLOR_TEMPLATES",
    "SHAPE_TEMPLATES",
    "ContrastiveEvaluator",
    "binding_accuracy",
    "retrieval_recall",
    "zero_shot_accuracy",
]
