"""Contrastive image-text pretraining: CLIP (InfoNCE), SigLIP (pairwise sigmoid) and Llip (caption-conditioned
mixture of image tokens). The recipe picks the model (`DualEncoder` or `Llip`) and the loss; this module
trains them and runs the shared retrieval / zero-shot / binding evaluation on every val split.
"""

from __future__ import annotations

from typing import Any

from lightning_vlm.data.collate import Collator
from lightning_vlm.eval import ContrastiveEvaluator
from lightning_vlm.eval.suite import Evaluator
from lightning_vlm.models.contrastive import ContrastiveOutput, HardNegatives
from lightning_vlm.paradigms.base import VLMParadigm


class Contrastive(VLMParadigm):
    """`model(pixel_values, input_ids, attention_mask, negatives)` -> output; `loss(output)` -> LossOutput.

    Hard-negative captions (the DataModule's ``hard_negatives: k``) reach the model when the batch has them.
    """

    def model_output(self, batch: dict[str, Any]) -> ContrastiveOutput:
        if batch.get("modality", "pair") != "pair":
            raise ValueError(f"a contrastive model trains on image-text pairs, not {batch['modality']}-only batches "
                             "(a masked model, FLAVA, takes those)")
        return self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                          HardNegatives.from_batch(batch))

    def evaluators(self) -> list[Evaluator]:
        return [ContrastiveEvaluator(Collator(self.tokenizer).tokenize, max_samples=self.eval_max_samples)]

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Image and caption representations of a batch, keyed by sample, for retrieval indexes: ``key`` per sample,
        ``image`` and ``text`` (N, E) tensors (what `PredictionWriter` keeps as safetensors)."""
        return {"key": [m["key"] for m in batch["meta"]], "image": self.model.encode_images(batch["pixel_values"]),
                "text": self.model.encode_texts(batch["input_ids"], batch["attention_mask"])}

    @property
    def tokenizer(self):
        return self.model.text.tokenizer
