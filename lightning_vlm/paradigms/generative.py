"""Image-to-text training and evaluation for any model that prompts a language model with an image.

The model (a `VisualPromptLM`: LLaVA, PaliGemma's prefix-LM, Flamingo, Fuyu, ...) predicts the text and
``generate``s; this paradigm trains it on the next-token loss over the target text (captions and answers, as the
DataModule's task mixture lays them out), evaluates generated captions (CIDEr-D, BLEU-4) and answers (VQA accuracy
per skill), and answers about any image from Python (`generate`) or over a split (`predict`). A text-only batch (a
``modality: text`` source mixed in against forgetting, as CogVLM2 and Phi-3-vision do) trains the LM alone on
``text_lm``, the next-token loss on every token of the text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from lightning_vlm.data.collate import Collator, Example
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.tasks import TextExample
from lightning_vlm.data.transforms import ImageTransform
from lightning_vlm.encoders.lm import NextTokenOutput
from lightning_vlm.errors import InvalidSettingError
from lightning_vlm.eval.generation import GenerationEvaluator
from lightning_vlm.eval.likelihood import LikelihoodZeroShot
from lightning_vlm.eval.suite import Evaluator
from lightning_vlm.losses import LossOutput, NextTokenLoss, WeightedLoss
from lightning_vlm.losses.language import next_token_loss, sequence_log_likelihood
from lightning_vlm.models.visual_prompt import VisualPromptLM
from lightning_vlm.paradigms.base import VLMParadigm
from lightning_vlm.tokens import IMAGE_TOKEN


class ImageToText(VLMParadigm):
    """Trains a `VisualPromptLM` on the next-token loss (`NextTokenLoss` unless the recipe names another); greedy
    generation unless `generation` says otherwise."""

    def __init__(self, model: VisualPromptLM, loss: WeightedLoss | None = None, eval_max_samples: int | None = 1000,
                 generation: dict[str, Any] | None = None, **optim) -> None:
        super().__init__(model, loss if loss is not None else NextTokenLoss(), eval_max_samples, **optim)
        self.generation = {"max_new_tokens": 24, "num_beams": 1, "do_sample": False, **(generation or {})}

    @property
    def tokenizer(self):
        """The LM's tokenizer lays out prompts and targets."""
        return self.model.language_model.tokenizer

    @property
    def image_token(self) -> str | None:
        """The placeholder the data side writes where each image stands, for a model that places images."""
        return IMAGE_TOKEN if self.model.language_model is not None and self.model.places_images else None

    # ---- training and evaluation --------------------------------------------------------------------------------
    def model_output(self, batch: dict[str, Any]) -> NextTokenOutput:
        return self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                          batch.get("image_index"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """Image-text batches train on the family's loss; a text-only batch on `text_loss`, skipped (the step still
        counts) while nothing the LM computes trains, as in a phase that freezes it."""
        if batch.get("modality", "pair") != "text":
            return super().training_step(batch, batch_idx)
        losses = self.text_loss(batch)
        if not self._finite_everywhere(losses.total):
            return self._nonfinite(losses, batch)
        self.log_losses("train", losses, batch_size=len(batch["meta"]))
        return losses.total if losses.total.requires_grad else None

    def text_loss(self, batch: dict[str, Any]) -> LossOutput:
        """``text_lm``: the next-token loss of the LM alone on a text-only batch (no image encoded, none placed)."""
        out = self.model.predict_language(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return LossOutput.from_terms({"text_lm": next_token_loss(out)})

    def setup(self, stage: str) -> None:
        """Loads ``init_from``; a text-only training source is refused at once when there is no LM to train on it."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.model.language_model is None and isinstance(datamodule, ShardDataModule):
            text = [source.shards for source in datamodule.train_sources() if source.modality == "text"]
            if text:
                raise InvalidSettingError(f"text-only source(s) {text} train a language model, which this "
                                          f"{type(self.model).__name__} lacks: remove them from data.init_args.train")

    def evaluators(self) -> list[Evaluator]:
        """Generated captions and answers scored, and zero-shot colour and shape by caption likelihood (on at most
        200 images: each costs a forward pass per candidate); none without a language model."""
        if self.model.language_model is None:
            return []
        zero_shot = LikelihoodZeroShot(self.caption_log_likelihoods, min(self.eval_max_samples or 200, 200))
        return [*self.generation_evaluators(), zero_shot]

    def generation_evaluators(self) -> list[Evaluator]:
        """Generated captions and answers scored; none without a language model (a family that also embeds,
        BLIP-2 or CoCa, answers zero-shot by its embeddings instead of by likelihood)."""
        return [GenerationEvaluator(self._answers, self.eval_max_samples)] if self.model.language_model else []

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generated text for every sample, from its own prompt (a caption prompt or a question): one row per
        sample of ``key``, ``prompt`` and ``answer`` (what `PredictionWriter` keeps as JSONL)."""
        return {"key": [m["key"] for m in batch["meta"]], "prompt": [m["prompt"] for m in batch["meta"]],
                "answer": self._answers(batch)}

    # ---- generation -----------------------------------------------------------------------------------------------
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

    @torch.no_grad()
    def generate_text(self, pixel_values: Tensor, prompts: list[str], system: str = "",
                      history: Sequence[tuple[str, str]] = (), **generation: Any) -> list[str]:
        """Decoded answers of the LM to ``prompts``, one per image, after the (user, assistant) turns of `history`
        (through the LM's chat template where it has one; greedy unless `generation` says otherwise: num_beams for
        beam search, do_sample with top_p for nucleus sampling)."""
        task = "chat" if history else "vqa"
        texts = [TextExample(task, p, "", system=system, history=list(history)) for p in prompts]
        return self._generate(pixel_values, texts, None, **generation)

    @torch.no_grad()
    def caption_log_likelihoods(self, pixel_values: Tensor, captions: Sequence[Sequence[str]], prompt: str = "",
                                chunk_size: int = 128) -> Tensor:
        """(N, C): the log-likelihood of each image's C candidate captions given the image and the caption prompt,
        summed over the caption's tokens and its end token (eval/likelihood.py)."""
        collate = Collator(self.tokenizer, image_token=self.image_token)
        pairs = [(image, caption) for image, candidates in enumerate(captions) for caption in candidates]
        scores = []
        for start in range(0, len(pairs), chunk_size):
            examples = [Example(pixel_values[image], TextExample("caption", prompt, caption))
                        for image, caption in pairs[start:start + chunk_size]]
            batch = {key: value.to(self.device) if isinstance(value, Tensor) else value
                     for key, value in collate(examples).items()}
            scores.append(sequence_log_likelihood(self.model_output(batch)))
        return torch.cat(scores).view(len(captions), -1)

    def _answers(self, batch: dict) -> list[str]:
        """Generated replies to every sample's own last prompt, after its earlier turns (a chat's, a few-shot
        example's demonstrations with their images)."""
        texts = [TextExample(m["task"], m["prompt"], "", system=m.get("system", ""), history=m.get("history", []))
                 for m in batch["meta"]]
        return self._generate(batch["pixel_values"], texts, batch.get("image_index"))

    def _generate(self, pixel_values: Tensor, texts: list[TextExample], image_index: Tensor | None,
                  **generation: Any) -> list[str]:
        ids, mask = Collator(self.tokenizer, image_token=self.image_token).generation_inputs(texts)
        new = self.model.generate(pixel_values, ids.to(self.device), mask.to(self.device), image_index,
                                  **{**self.generation, **generation})
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
