"""BLIP-2 (Li et al., 2023): Q-Former pretraining in two stages, in one `fit` or two.

Stage 1 learns queries that extract the text-relevant visual content of a frozen image encoder:
``itc`` + ``itm`` + ``itg`` on the Q-Former. Stage 2 feeds the queries, projected, to a frozen language
model (or one adapted with LoRA) as a soft visual prompt: ``lm``, the next-token loss on the target text.
The loss's weights (`BLIP2Loss`) say which stage runs; the staged-freezing plan (callbacks/staged_freezing.py)
switches them at a step together with what is frozen, so `recipes/blip2.yaml` runs both stages in one fit.

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
from lightning_vlm.eval.suite import Evaluator, full_precision
from lightning_vlm.losses import BLIP2Loss, WeightedLoss
from lightning_vlm.models.blip2 import BLIP2, BLIP2Output, TextBatch
from lightning_vlm.paradigms.generative import ImageToText


class BLIP2Paradigm(ImageToText):
    """Trains a `BLIP2` model on its stage-1 terms and its stage-2 ``lm`` term (`BLIP2Loss`; without a language
    model the default loss weighs ``lm`` 0)."""

    def __init__(
        self,
        model: BLIP2,
        loss: WeightedLoss | None = None,
        eval_max_samples: int | None = 1000,
        rerank_k: int = 8,
        generation: dict | None = None,
        **optim,
    ) -> None:
        loss = loss if loss is not None else BLIP2Loss({} if model.language_model else {"lm": 0.0})
        super().__init__(model, loss, eval_max_samples, generation, **optim)
        self.rerank_k = rerank_k

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

    # ---- training ---------------------------------------------------------------------------------------------------
    def model_output(self, batch: dict[str, Any]) -> BLIP2Output:
        """The terms the loss weighs (stage 1 on the captions, in the Q-Former's tokens; ``lm`` on the target text)."""
        objectives = self.loss.active_terms()
        instruction = None
        if "lm" in objectives and self.model.instruction_aware:
            instruction = self._instruction([meta["prompt"] for meta in batch["meta"]])
        captions = None
        if {"itc", "itm", "itg"} & objectives:
            captions = TextBatch(batch["caption_input_ids"], batch["caption_attention_mask"])
        return self.model(batch["pixel_values"], captions, batch["input_ids"], batch["attention_mask"],
                          batch["labels"], batch.get("image_index"), instruction, objectives)

    def _instruction(self, prompts: list[str]) -> TextBatch:
        """Each image's prompt in the Q-Former's tokens, for an instruction-aware model's queries."""
        ids, mask = self.qformer_tokenize(prompts)
        return TextBatch(ids.to(self.device), mask.to(self.device))

    @contextmanager
    def _instructed(self, prompts: list[str]) -> Iterator[None]:
        """An instruction-aware model's queries read ``prompts`` (one per image, in the Q-Former's tokenizer)."""
        if not self.model.instruction_aware:
            yield
            return
        with self.model.instructed(self._instruction(prompts)):
            yield

    def _generate(self, pixel_values: Tensor, texts: list[TextExample], image_index: Tensor | None,
                  **generation: Any) -> list[str]:
        with self._instructed([text.prompt for text in texts]):
            return super()._generate(pixel_values, texts, image_index, **generation)

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def evaluators(self) -> list[Evaluator]:
        """Retrieval, zero-shot and binding by ITC, image->text recall after ITM re-ranking, and generation."""
        retrieval = ITMReranking(self.qformer_tokenize, self.rerank_k, max_samples=self.eval_max_samples)
        return [retrieval, *self.generation_evaluators()]


class ITMReranking(ContrastiveEvaluator):
    """The shared suite by ITC, plus image->text recall@1/5 after re-scoring each image's ITC top-k distinct captions
    with ITM (on this rank's share, before the suite gathers every rank's images to score them)."""

    def __init__(self, tokenize, rerank_k: int, max_samples: int | None = None) -> None:
        super().__init__(tokenize, max_samples=max_samples)
        self.rerank_k = rerank_k

    def reset(self) -> None:
        super().reset()
        self.features: list[Tensor] = []

    @torch.no_grad()
    def update(self, model: BLIP2, batch: dict[str, Any]) -> None:
        super().update(model, batch)
        # float32, like the suite's: the re-ranking at epoch end runs outside the steps' autocast
        self.features.append(full_precision(model.image_features(batch["pixel_values"])))

    @torch.no_grad()
    def compute(self, model: BLIP2, split: str) -> dict[str, float]:
        features = torch.cat(self.features)[: len(self.metas)]
        captions = [meta["caption"] for meta in self.metas]
        distinct = list(dict.fromkeys(captions))
        ids, mask = (tensor.to(features.device) for tensor in self.tokenize(distinct))
        itc = model.similarity(torch.cat(self.image_reprs), model.encode_texts(ids, mask))

        def itm(rows: Tensor, cols: Tensor) -> Tensor:
            return model.match_logits(features[rows], ids[cols], mask[cols]).softmax(-1)[:, 1]

        recalls = rerank_recall(itc, itm, captions, distinct, self.rerank_k)
        return {**{f"{split}/{name}": value for name, value in recalls.items()}, **super().compute(model, split)}
