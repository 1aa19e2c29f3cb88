"""CoCa (Yu et al., 2022): a contrastive loss between the pooled image and the caption's [CLS] embedding, and a
captioning loss through the multimodal layers (`CoCaLoss`, weighted 1 and 2 by default). Evaluated as both a
retriever (the shared suite: retrieval, zero-shot, binding) and a captioner (CIDEr-D, BLEU-4, VQA)."""

from __future__ import annotations

from typing import Any

from lightning_vlm.data.collate import Collator
from lightning_vlm.eval import ContrastiveEvaluator
from lightning_vlm.eval.suite import Evaluator
from lightning_vlm.losses import CoCaLoss, WeightedLoss
from lightning_vlm.models.coca import CoCa, CoCaOutput
from lightning_vlm.paradigms.generative import ImageToText


class CoCaParadigm(ImageToText):
    """Trains a `CoCa` model on its contrastive and captioning terms."""

    def __init__(self, model: CoCa, loss: WeightedLoss | None = None, eval_max_samples: int | None = 1000,
                 generation: dict | None = None, **optim) -> None:
        super().__init__(model, loss if loss is not None else CoCaLoss(), eval_max_samples, generation, **optim)

    @property
    def caption_tokenizer(self):
        """The captions of every sample, for the contrastive pair, in the LM's own tokens."""
        return self.model.language_model.tokenizer

    def model_output(self, batch: dict[str, Any]) -> CoCaOutput:
        return self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                          batch["caption_input_ids"], batch["caption_attention_mask"])

    def evaluators(self) -> list[Evaluator]:
        retrieval = ContrastiveEvaluator(Collator(self.caption_tokenizer).tokenize, self.eval_max_samples)
        return [retrieval, *self.generation_evaluators()]
