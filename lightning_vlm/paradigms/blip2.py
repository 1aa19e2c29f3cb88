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

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from lightning_vlm.data.collate import Collator
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.transforms import ImageTransform
from lightning_vlm.eval import ContrastiveEvaluator
from lightning_vlm.eval.generation import GenerationEvaluator
from lightning_vlm.eval.retrieval import rerank_recall
from lightning_vlm.losses.contrastive import temperature
from lightning_vlm.losses.distributed import local_batch
from lightning_vlm.losses.output import LossOutput
from lightning_vlm.models.blip2 import BLIP2, TextBatch
from lightning_vlm.paradigms.base import VLMParadigm

STAGE1 = ("itc", "itm", "itg")


class BLIP2Paradigm(VLMParadigm):
    """Trains a `BLIP2` model on a weighted sum of its stage-1 terms and its stage-2 ``lm`` term."""

    def __init__(
        self,
        model: BLIP2,
        loss_weights: dict[str, float] | None = None,
        eval_max_samples: int | None = 1000,
        rerank_k: int = 8,
        generation: dict[str, Any] | None = None,
        **optim,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.loss_weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0, "lm": 1.0 if model.language_model else 0.0}
        self.loss_weights.update(loss_weights or {})
        self.eval_max_samples, self.rerank_k = eval_max_samples, rerank_k
        self.generation = {"max_new_tokens": 24, "num_beams": 1, "do_sample": False, **(generation or {})}
        self.evaluators: dict[int, tuple[ContrastiveEvaluator, GenerationEvaluator, list]] = {}

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

    # ---- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        self.log_losses("train", losses, batch_size=len(batch["meta"]))
        return losses.total

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
            terms["lm"] = self.model.lm_loss(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                             batch["labels"])
        if not terms:
            raise ValueError(f"every loss weight is zero: {w}")
        total = sum(w[name] * value for name, value in terms.items())
        return LossOutput(total, terms, {"logit_scale": temperature(self.model.logit_scale.detach())})

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with local_batch():
            losses = self.losses(batch)
        self.log_losses(self.eval_split_name(dataloader_idx), losses, batch_size=len(batch["meta"]))
        suite, generated, features = self._evaluators(dataloader_idx)
        if not suite.full:
            suite.update(self.model, batch)
            features.append(self.model.image_features(batch["pixel_values"]))
        if self.model.language_model is not None and not generated.full:
            generated.update(batch["meta"], self._answers(batch))

    def on_validation_epoch_end(self) -> None:
        for idx, (suite, generated, features) in self.evaluators.items():
            split = self.eval_split_name(idx)
            # re-ranking first, on this rank's share: the suite then gathers every rank's images to score them
            metrics = self._itm_rerank(suite, torch.cat(features)[: len(suite.metas)], split)
            metrics.update(suite.compute(self.model, split))
            if generated.records:
                metrics.update(generated.compute(split))
            self.log_dict(metrics, add_dataloader_idx=False)
            suite.reset(), generated.reset(), features.clear()

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generated text for every sample, from its own prompt (a caption prompt or a question)."""
        return {"keys": [m["key"] for m in batch["meta"]], "prompts": [m["prompt"] for m in batch["meta"]],
                "generated": self._answers(batch)}

    @torch.no_grad()
    def generate(self, images: Sequence[Image.Image] | Tensor, prompt: str | Sequence[str] = "",
                 **generation: Any) -> list[str]:
        """What the LM says about each image given ``prompt`` (one for all, or one per image): the notebook API.

        ``images``: PIL images (resized and normalised as this model reads them) or ready pixel values.
        """
        pixels = images if isinstance(images, Tensor) else self.preprocess(images)
        prompts = [prompt] * len(pixels) if isinstance(prompt, str) else list(prompt)
        return self.generate_text(pixels.to(self.device), prompts, **generation)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> (B, 3, H, W) pixel values at the vision backbone's input size and statistics."""
        transform = ImageTransform(self.model.vision.data_config["input_size"][-1], self.image_mean, self.image_std)
        return torch.stack([transform(RawSample("", image.convert("RGB"), "", {}), random.Random(0))[0]
                            for image in images])

    def sample_outputs(self, batch: dict) -> list[str] | None:
        """Generated answers for the sample-logging callback (None without a language model)."""
        return self._answers(batch) if self.model.language_model is not None else None

    def _answers(self, batch: dict) -> list[str]:
        """Generated replies to every sample's own prompt (and the batch's system prompt)."""
        metas = batch["meta"]
        return self.generate_text(batch["pixel_values"], [m["prompt"] for m in metas], system=metas[0].get("system", ""))

    @torch.no_grad()
    def generate_text(self, pixel_values: Tensor, prompts: list[str], system: str = "", **generation: Any) -> list[str]:
        """Decoded answers of the LM to ``prompts`` about the images (greedy unless `generation` says otherwise:
        num_beams for beam search, do_sample with top_p for nucleus sampling)."""
        ids, mask = Collator(self.tokenizer).prompts(prompts, system)
        new = self.model.generate(pixel_values, ids.to(self.device), mask.to(self.device),
                                  **{**self.generation, **generation})
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _itm_rerank(self, suite: ContrastiveEvaluator, features: Tensor, split: str) -> dict[str, float]:
        """Image->text recall@1/5 after re-scoring each image's ITC top-k distinct captions with ITM."""
        captions = [meta["caption"] for meta in suite.metas]
        distinct = list(dict.fromkeys(captions))
        tokenize = Collator(self.caption_tokenizer).tokenize
        ids, mask = tokenize(distinct)
        images = torch.cat(suite.image_reprs)
        itc = self.model.similarity(images, self.model.encode_texts(ids.to(self.device), mask.to(self.device)))

        def itm(rows: Tensor, cols: Tensor) -> Tensor:
            logits = self.model.match_logits(features[rows], ids[cols].to(self.device), mask[cols].to(self.device))
            return logits.softmax(-1)[:, 1]

        recalls = rerank_recall(itc, itm, captions, distinct, self.rerank_k)
        return {f"{split}/{name}": value for name, value in recalls.items()}

    def _evaluators(self, idx: int) -> tuple[ContrastiveEvaluator, GenerationEvaluator, list]:
        if idx not in self.evaluators:
            suite = ContrastiveEvaluator(Collator(self.caption_tokenizer).tokenize, max_samples=self.eval_max_samples)
            self.evaluators[idx] = (suite, GenerationEvaluator(self.eval_max_samples), [])
        return self.evaluators[idx]
