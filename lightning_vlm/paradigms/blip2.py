"""BLIP-2 (Li et al., 2023): Q-Former pretraining in two stages, in one `fit` or two.

Stage 1 learns queries that extract the text-relevant visual content of a frozen image encoder:
``itc`` + ``itm`` + ``itg`` on the Q-Former. Stage 2 feeds the queries, projected, to a frozen language
model (or one adapted with LoRA) as a soft visual prompt: ``lm``, the next-token loss on the target text.
The loss weights say which stage runs; the staged-freezing plan (callbacks/staged_freezing.py) switches them
at a step together with what is frozen, so `recipes/blip2.yaml` runs both stages in one fit.

Evaluation: retrieval / zero-shot / binding by ITC (the shared suite) plus image->text recall after ITM
re-ranking of the ITC top-k; with a language model, generated captions (CIDEr-D, BLEU-4) and answers (VQA
accuracy per skill).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lightning_vlm.data.collate import Collator
from lightning_vlm.data.tasks import TextExample
from lightning_vlm.eval import ContrastiveEvaluator
from lightning_vlm.eval.retrieval import rerank_recall
from lightning_vlm.eval.suite import full_precision
from lightning_vlm.losses.contrastive import temperature
from lightning_vlm.distributed import local_batch
from lightning_vlm.losses.output import LossOutput
from lightning_vlm.models.blip2 import BLIP2, TextBatch
from lightning_vlm.paradigms.generative import ImageToText

STAGE1 = ("itc", "itm", "itg")


class BLIP2Paradigm(ImageToText):
    """Trains a `BLIP2` model on a weighted sum of its stage-1 terms and its stage-2 ``lm`` term."""

    def __init__(
        self,
        model: BLIP2,
        loss_weights: dict[str, float] | None = None,
        eval_max_samples: int | None = 1000,
        rerank_k: int = 8,
        generation: dict | None = None,
        **optim,
    ) -> None:
        super().__init__(model, eval_max_samples, generation, **optim)
        self.loss_weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0, "lm": 1.0 if model.language_model else 0.0}
        self.loss_weights.update(loss_weights or {})
        self.rerank_k = rerank_k
        self.retrieval_evaluators: dict[int, tuple[ContrastiveEvaluator, list[Tensor]]] = {}

    # ---- what the data side reads ------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The LM's tokenizer lays out prompts and targets; without an LM, the Q-Former's."""
        lm = self.model.language_model
        return lm.tokenizer if lm is not None else self.model.qformer.tokenizer

    @property
    def caption_tokenizer(self):
        """The Q-Former's tokenizer, for the captions of the stage-1 objectives."""
        return self.model.qformer.tokenizer

    def qformer_tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) of plain texts in the Q-Former's tokenizer, laid out as its captions are
        (evaluation captions, ITM re-ranking, an instruction-aware model's prompts)."""
        return Collator(self.caption_tokenizer).tokenize(texts)

    # ---- training -------------------------------------------------------------------------------------------------
    def losses(self, batch: dict) -> LossOutput:
        """The weighted sum of the terms whose weight is not zero; terms of weight zero are not computed."""
        w, terms = self.loss_weights, {}
        if any(w.get(name) for name in STAGE1):
            image = self.model.image_features(batch["pixel_values"])
            text = TextBatch(batch["caption_input_ids"], batch["caption_attention_mask"])
            if w.get("itc") or w.get("itm"):
                itc, similarity = self.model.itc(image, text)
                if w.get("itc"):
                    terms["itc"] = itc
                if w.get("itm"):
                    terms["itm"] = self.model.itm(image, text, similarity)
            if w.get("itg"):
                terms["itg"] = self.model.itg(image, text)
        if w.get("lm"):
            with self._instructed([meta["prompt"] for meta in batch["meta"]]):
                terms["lm"] = super().losses(batch).total
        if not terms:
            raise ValueError(f"every loss weight is zero: {w}")
        total = sum(w[name] * value for name, value in terms.items())
        return LossOutput(total, terms, {"logit_scale": temperature(self.model.logit_scale.detach())})

    @contextmanager
    def _instructed(self, prompts: list[str]) -> Iterator[None]:
        """An instruction-aware model's queries read ``prompts`` (one per image, in the Q-Former's tokenizer)."""
        if not self.model.instruction_aware:
            yield
            return
        ids, mask = self.qformer_tokenize(prompts)
        with self.model.instructed(TextBatch(ids.to(self.device), mask.to(self.device))):
            yield

    def _generate(self, pixel_values: Tensor, texts: list[TextExample], image_index: Tensor | None,
                  **generation: Any) -> list[str]:
        with self._instructed([text.prompt for text in texts]):
            return super()._generate(pixel_values, texts, image_index, **generation)

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with local_batch():
            losses = self.losses(batch)
        self.log_losses(self.eval_split_name(dataloader_idx), losses, batch_size=len(batch["meta"]))
        if dataloader_idx not in self.retrieval_evaluators:
            suite = ContrastiveEvaluator(self.qformer_tokenize, max_samples=self.eval_max_samples)
            self.retrieval_evaluators[dataloader_idx] = (suite, [])
        suite, features = self.retrieval_evaluators[dataloader_idx]
        if not suite.full:
            suite.update(self.model, batch)
            # float32, like the suite's: the re-ranking at epoch end runs outside the steps' autocast
            features.append(full_precision(self.model.image_features(batch["pixel_values"])))
        self.update_generation(batch, dataloader_idx)

    def eval_metrics(self, dataloader_idx: int, split: str) -> dict[str, float]:
        """ITM re-ranking first, on this rank's share (the suite then gathers every rank's images to score
        them), then the shared suite by ITC, then generation."""
        suite, features = self.retrieval_evaluators[dataloader_idx]
        metrics = self._itm_rerank(suite, torch.cat(features)[: len(suite.metas)], split)
        metrics.update(suite.compute(self.model, split))
        suite.reset(), features.clear()
        return {**metrics, **super().eval_metrics(dataloader_idx, split)}

    def _itm_rerank(self, suite: ContrastiveEvaluator, features: Tensor, split: str) -> dict[str, float]:
        """Image->text recall@1/5 after re-scoring each image's ITC top-k distinct captions with ITM."""
        captions = [meta["caption"] for meta in suite.metas]
        distinct = list(dict.fromkeys(captions))
        ids, mask = (tensor.to(self.device) for tensor in self.qformer_tokenize(distinct))
        images = torch.cat(suite.image_reprs)
        itc = self.model.similarity(images, self.model.encode_texts(ids, mask))

        def itm(rows: Tensor, cols: Tensor) -> Tensor:
            return self.model.match_logits(features[rows], ids[cols], mask[cols]).softmax(-1)[:, 1]

        recalls = rerank_recall(itc, itm, captions, distinct, self.rerank_k)
        return {f"{split}/{name}": value for name, value in recalls.items()}
