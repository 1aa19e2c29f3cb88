"""Zero-shot by caption likelihood, the generative entries' answer to the zero-shot question: a candidate's score
equals its log-likelihood computed by hand from the LM's logits, candidates differ from the caption only in the
asked attribute, and the evaluator scores the right rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_vlm.adapters import MLP
from lightning_vlm.data.collate import Collator, Example
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.tasks import TextExample
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.eval.likelihood import LikelihoodZeroShot, substituted
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.paradigms.generative import ImageToText
from lightning_vlm.tokens import IGNORE_INDEX

from test_llava import TINY_LM, TINY_VIT


def tiny_llava(root: str) -> ImageToText:
    torch.manual_seed(0)
    model = LLaVA(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  LanguageModel(tokenizer=root, config=TINY_LM), MLP())
    return ImageToText(model).eval()


def test_a_candidate_scores_its_log_likelihood_computed_by_hand(tiny_benchmark):
    paradigm = tiny_llava(tiny_benchmark)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    captions = [["a small red circle.", "a small blue circle."], ["a large green star.", "a large green square."]]
    scores = paradigm.caption_log_likelihoods(pixels, captions, chunk_size=3)  # chunks cut across images
    assert scores.shape == (2, 2)
    for image, candidates in enumerate(captions):
        for column, caption in enumerate(candidates):
            batch = Collator(paradigm.tokenizer, image_token=paradigm.image_token)(
                [Example(pixels[image], TextExample("caption", "", caption))])
            out = paradigm.model_output(batch)
            log_probs = F.log_softmax(out.head(out.hidden).float(), dim=-1)[0]  # every position, (L, V)
            labels = out.labels[0]  # aligned with the hidden states: image tokens spliced in, unlabelled
            by_hand = sum(log_probs[t, labels[t + 1]] for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX)
            assert (labels != IGNORE_INDEX).sum() >= 4  # the caption's tokens and its end token
            torch.testing.assert_close(scores[image, column], by_hand, rtol=1e-5, atol=1e-5)


def test_candidates_change_only_the_asked_attribute_in_every_object_phrase():
    caption = "a small red circle left of a large red star. the word red is written."
    assert substituted(caption, "color", "blue") == \
        "a small blue circle left of a large blue star. the word red is written."
    assert substituted(caption, "shape", "square") == \
        "a small red square left of a large red square. the word red is written."


def test_the_evaluator_scores_the_rows_that_share_one_value(tiny_benchmark):
    batch = next(iter(ShardDataModule(root=tiny_benchmark, tasks={"caption": 1}, batch_size=32).eval_loader("val")))
    scored = []

    def oracle(pixels, captions):
        """Prefers each image's true caption: every candidate list holds it exactly once."""
        scored.append(len(captions))
        truth = [meta["caption"] for meta in batch["meta"]]
        rows = [next(i for i, t in enumerate(truth) if t in candidates) for candidates in captions]
        return torch.tensor([[float(c == truth[row]) for c in candidates] for row, candidates in zip(rows, captions)])

    evaluator = LikelihoodZeroShot(oracle, max_samples=32)
    evaluator.update(None, batch)
    metrics = evaluator.compute(None, "val")
    assert metrics["val/zeroshot_color"] == 1.0 and metrics["val/zeroshot_shape"] == 1.0
    assert scored == [metrics["val/zeroshot_color_n"], metrics["val/zeroshot_shape_n"]]
