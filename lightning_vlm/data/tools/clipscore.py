"""CLIPScore (Hessel et al., 2021) of image-caption pairs from a trained contrastive model: w x max(cos, 0) of the
image's and the caption's embeddings, w = 2.5; what ``data curate`` ranks pairs by (bootstrapping: a model trained
on the data judges the data).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_vlm.data.collate import Collator
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
from lightning_vlm.errors import InvalidSettingError, MissingInputError

CLIPSCORE_WEIGHT = 2.5  # the paper's w, which stretches the cosines a CLIP gives real pairs over [0, 2.5]
SPELT_OUT_LIMIT = 0.5  # above this share of caption words spelt out piece by piece, the tokenizer is not the data's
_PIECE_MARKS = "#Ġ▁"  # WordPiece, byte-level BPE and SentencePiece continuation or word-start marks


@dataclass
class PairScorer:
    """What CLIPScore needs of a trained model: ``model.encode_images(pixels)`` and ``model.encode_texts(ids,
    mask)`` giving (B, E) embeddings, the tokenizer it reads captions with, and its evaluation image transform."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    transform: ImageTransform


@torch.no_grad()
def clip_scores(scorer: PairScorer, images: list[Image.Image], captions: list[str]) -> Tensor:
    """(N,) CLIPScore of image i with caption i; an `InvalidSettingError` when the model's embeddings are not one
    vector per image and per text (a model that conditions one on the other has no cosine to give)."""
    pixels = torch.stack([scorer.transform(RawSample("", image, "", {}), random.Random(0))[0] for image in images])
    input_ids, attention_mask = Collator(scorer.tokenizer).tokenize(captions)
    image_emb = scorer.model.encode_images(pixels)
    text_emb = scorer.model.encode_texts(input_ids, attention_mask)
    if not all(isinstance(emb, Tensor) and emb.dim() == 2 for emb in (image_emb, text_emb)):
        raise InvalidSettingError(f"{type(scorer.model).__name__} does not embed an image and a text as one vector "
                                  "each, so it has no CLIPScore: score with a CLIP or SigLIP recipe")
    return CLIPSCORE_WEIGHT * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).clamp(min=0)


def spelt_out_share(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> float:
    """The share of the captions' words (of two characters or more) that the tokenizer does not know: read as the
    unknown token, or spelt out one character per piece, as the benchmark's tokenizer spells words it never saw."""
    encoded = tokenizer(captions, add_special_tokens=False)
    words = unknown = 0
    for row in range(len(captions)):
        pieces: dict[int, list[str]] = {}
        for word, token in zip(encoded.word_ids(row), encoded.tokens(row)):
            if word is not None:
                pieces.setdefault(word, []).append(token)
        for tokens in pieces.values():
            letters = [token.lstrip(_PIECE_MARKS) for token in tokens]
            if sum(map(len, letters)) < 2:
                continue
            words += 1
            unknown += tokenizer.unk_token in tokens or all(len(letter) <= 1 for letter in letters)
    return unknown / words if words else 0.0


def check_vocabulary(scorer: PairScorer, captions: list[str]) -> None:
    """An `InvalidSettingError` when the scorer's tokenizer does not know most of the captions' words: its scores
    of this data would mean nothing."""
    share = spelt_out_share(scorer.tokenizer, captions)
    if share > SPELT_OUT_LIMIT:
        raise InvalidSettingError(f"the scorer's tokenizer does not match these captions: it does not know "
                                  f"{share:.0%} of their words; score with a model trained on this kind of text")


def load_scorer(config: str | Path, checkpoint: str | Path,
                load_run: Callable[[str], tuple[Any, Any]] | None) -> PairScorer:
    """The model a recipe builds, with a checkpoint's weights, as a `PairScorer` (images prepared as the recipe's
    evaluation prepares them). `load_run` builds the recipe's paradigm and DataModule (``lightning_vlm.cli.load_run``,
    handed down by the command line, which sits above the data layer). The errors name the fix: a recipe whose
    model does not embed images and texts, a checkpoint whose tensors do not fit the recipe's model (a tokenizer of
    another size than the one it trained with, above all).
    """
    for path, option in ((config, "--scorer-config"), (checkpoint, "--scorer-checkpoint")):
        if not Path(path).is_file():
            raise MissingInputError(f"{option} {path} not found: give the recipe and the .ckpt of a trained CLIP")
    if load_run is None:
        raise InvalidSettingError("a CLIPScore scorer is loaded through `python -m lightning_vlm data curate`")
    paradigm, datamodule = load_run(str(config))
    model = getattr(paradigm, "model", None)
    if not all(callable(getattr(model, name, None)) for name in ("encode_images", "encode_texts")):
        raise InvalidSettingError(f"{config} builds {type(paradigm).__name__}, which does not embed images and texts: "
                                  "CLIPScore needs a contrastive recipe (e.g. recipes/clip.yaml)")
    tokenizer = paradigm.caption_tokenizer or paradigm.tokenizer
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    _check_fits(paradigm.state_dict(), state, len(tokenizer), f"{checkpoint} does not fit {config}")
    try:
        paradigm.load_state_dict(state)
    except RuntimeError as err:
        raise InvalidSettingError(f"{checkpoint} does not fit {config}: {str(err).splitlines()[0]}") from None
    data = datamodule.hparams
    transform = ImageTransform(data.image_size, tuple(data.image_mean or CLIP_MEAN), tuple(data.image_std or CLIP_STD))
    return PairScorer(model.eval(), tokenizer, transform)


def _check_fits(built: dict[str, Tensor], saved: dict[str, Tensor], vocabulary: int, prefix: str) -> None:
    """An `InvalidSettingError` naming the first tensor whose shape differs, and the tokenizer when its size is the
    difference (the recipe reads a tokenizer other than the one the checkpoint was trained with)."""
    for name, tensor in saved.items():
        if name in built and built[name].shape != tensor.shape:
            shapes = f"{name} is {tuple(tensor.shape)} there, {tuple(built[name].shape)} here"
            if vocabulary in built[name].shape and vocabulary not in tensor.shape:
                raise InvalidSettingError(f"{prefix}: the recipe's tokenizer ({vocabulary} tokens) is not the one the "
                                          f"checkpoint was trained with ({shapes}); point the recipe at that one")
            raise InvalidSettingError(f"{prefix}: {shapes}")
