"""CoCa (Yu et al., 2022): a contrastive loss between the pooled image and the caption's [CLS] embedding, and a
captioning loss through the multimodal layers, weighted 1.0 and 2.0 by default. Evaluated as both a retriever
(the shared suite: retrieval, zero-shot, binding) and a captioner (CIDEr-D, BLEU-4, VQA)."""

from __future__ import annotations

from lightning_vlm.data.collate import Collator
from lightning_vlm.eval import ContrastiveEvaluator
from lightning_vlm.losses.contrastive import CLIPLoss
from lightning_vlm.distributed import local_batch
from lightning_vlm.losses.output import LossOutput
from lightning_vlm.models.coca import CoCa
from lightning_vlm.paradigms.generative import ImageToText


class CoCaParadigm(ImageToText):
    """Trains a `CoCa` model on ``contrastive_weight`` x itc + ``caption_weight`` x caption."""

    def __init__(self, model: CoCa, contrastive_weight: float = 1.0, caption_weight: float = 2.0,
                 eval_max_samples: int | None = 1000, generation: dict | None = None, **optim) -> None:
        super().__init__(model, eval_max_samples, generation, **optim)
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight
        self.contrastive = CLIPLoss()
        self.retrieval_evaluators: dict[int, ContrastiveEvaluator] = {}

    @property
    def caption_tokenizer(self):
        """The captions of every sample, for the contrastive pair, in the LM's own tokens."""
        return self.model.language_model.tokenizer

    def losses(self, batch: dict) -> LossOutput:
        out = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                         batch["caption_input_ids"], batch["caption_attention_mask"])
        itc = self.contrastive(out.contrastive)
        terms = {"itc": self.contrastive_weight * itc.total, "caption": self.caption_weight * out.caption}
        return LossOutput.from_terms(terms, itc.stats)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with local_batch():
            losses = self.losses(batch)
        self.log_losses(self.eval_split_name(dataloader_idx), losses, batch_size=len(batch["meta"]))
        suite = self.retrieval_evaluators.setdefault(
            dataloader_idx, ContrastiveEvaluator(Collator(self.caption_tokenizer).tokenize, self.eval_max_samples))
        if not suite.full:
            suite.update(self.model, batch)
        self.update_generation(batch, dataloader_idx)

    def eval_metrics(self, dataloader_idx: int, split: str) -> dict[str, float]:
        suite = self.retrieval_evaluators[dataloader_idx]
        metrics = suite.compute(self.model, split)
        suite.reset()
        return {**metrics, **super().eval_metrics(dataloader_idx, split)}
