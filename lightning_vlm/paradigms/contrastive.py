"""Contrastive image-text pretraining: CLIP (InfoNCE), SigLIP (pairwise sigmoid) and Llip (caption-conditioned
mixture of image tokens). The recipe picks the model (`DualEncoder` or `Llip`) and the loss; this module
trains them and runs the shared retrieval / zero-shot / binding evaluation on every val split.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_vlm.data.collate import Collator
from lightning_vlm.eval import ContrastiveEvaluator
from lightning_vlm.distributed import local_batch
from lightning_vlm.losses.output import LossOutput
from lightning_vlm.models.contrastive import HardNegatives
from lightning_vlm.paradigms.base import VLMParadigm


class Contrastive(VLMParadigm):
    """`model(pixel_values, input_ids, attention_mask, negatives)` -> output; `loss(output)` -> LossOutput.

    Hard-negative captions (the DataModule's ``hard_negatives: k``) reach the model when the batch has them.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, eval_max_samples: int | None = 1000, **optim) -> None:
        super().__init__(**optim)
        self.save_hyperparameters(ignore=["model", "loss"])
        self.model, self.loss = model, loss
        self.evaluators: dict[int, ContrastiveEvaluator] = {}
        self.eval_max_samples = eval_max_samples

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self._losses(batch)
        self.log_losses("train", losses, batch_size=len(batch["meta"]))
        return losses.total

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with local_batch():  # eval batches need not match across ranks; the suite gathers what it scores
            losses = self._losses(batch)
        self.log_losses(self.eval_split_name(dataloader_idx), losses, batch_size=len(batch["meta"]))
        self._evaluator(dataloader_idx).update(self.model, batch)

    def on_validation_epoch_end(self) -> None:
        for idx, evaluator in self.evaluators.items():
            self.log_dict(evaluator.compute(self.model, self.eval_split_name(idx)), add_dataloader_idx=False)
            evaluator.reset()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Image and caption representations of a batch, keyed by sample, for retrieval indexes."""
        return {"keys": [m["key"] for m in batch["meta"]], "images": self.model.encode_images(batch["pixel_values"]),
                "texts": self.model.encode_texts(batch["input_ids"], batch["attention_mask"])}

    @property
    def tokenizer(self):
        return self.model.text.tokenizer

    def _losses(self, batch: dict) -> LossOutput:
        if batch.get("modality", "pair") != "pair":
            raise ValueError(f"a contrastive model trains on image-text pairs, not {batch['modality']}-only batches "
                             "(a masked model, FLAVA, takes those)")
        negatives = HardNegatives.from_batch(batch)
        return self.loss(self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], negatives))

    def _evaluator(self, dataloader_idx: int) -> ContrastiveEvaluator:
        if dataloader_idx not in self.evaluators:
            self.evaluators[dataloader_idx] = ContrastiveEvaluator(Collator(self.tokenizer).tokenize,
                                                                   max_samples=self.eval_max_samples)
        return self.evaluators[dataloader_idx]
