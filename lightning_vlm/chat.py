"""Talking with a trained model about one image: answers from a generative paradigm (one prompt, or a conversation
through the LM's chat template where it has one), zero-shot scores of labels from a model that embeds images and
texts. What ``python -m lightning_vlm chat`` runs; each function also works from Python on a loaded paradigm.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lightning_vlm.data.collate import Collator
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.transforms import ImageTransform
from lightning_vlm.errors import InvalidSettingError, MissingInputError
from lightning_vlm.eval.zero_shot import encode_texts, similarity_matrix
from lightning_vlm.paradigms.base import VLMParadigm
from lightning_vlm.paradigms.generative import ImageToText


def read_image(path: str) -> Image.Image:
    """The RGB image at ``path``; a `MissingInputError` when there is none, an `InvalidSettingError` when it is
    not an image."""
    if not Path(path).is_file():
        raise MissingInputError(f"image {path} not found: give --image an image file (PNG, JPEG, WebP)")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidSettingError(
            f"{path} cannot be read as an image ({err}): give --image a PNG, JPEG or WebP file"
        ) from None


def image_pixels(image: Image.Image, transform: ImageTransform) -> Tensor:
    """(1, 3, H, W): the image as the recipe's evaluation loader prepares it (resized, normalised, no flip)."""
    return transform(RawSample("", image, "", {}), random.Random(0))[0].unsqueeze(0)


def can_answer(paradigm: VLMParadigm) -> bool:
    """Whether the paradigm writes text about an image (a generative one with a language model)."""
    return isinstance(paradigm, ImageToText) and paradigm.model.language_model is not None


def can_score(paradigm: VLMParadigm) -> bool:
    """Whether the paradigm's model embeds images and texts and scores them against each other."""
    return all(hasattr(paradigm.model, name) for name in ("encode_images", "encode_texts", "similarity"))


def check_request(paradigm: VLMParadigm, labels: bool) -> None:
    """An `InvalidSettingError` when the paradigm cannot do what was asked (answer prompts, or score ``labels``),
    naming what it can do."""
    name = type(paradigm).__name__
    if labels and not can_score(paradigm):
        raise InvalidSettingError(
            f"{name} does not score labels (it embeds no texts): ask it with --prompt TEXT, "
            "or with neither option for a conversation"
        )
    if not labels and not can_answer(paradigm):
        raise InvalidSettingError(
            f"{name} writes no text: give --labels 'a red circle,a blue square' for zero-shot scores"
        )


@torch.no_grad()
def zero_shot(paradigm: VLMParadigm, pixels: Tensor, labels: Sequence[str]) -> list[tuple[str, float]]:
    """(label, probability) for each label, most likely first: a softmax over the model's similarity of the image
    with each label, the texts laid out as its evaluation captions are."""
    tokenize = Collator(paradigm.caption_tokenizer or paradigm.tokenizer).tokenize
    model = paradigm.model
    texts = encode_texts(model, tokenize, list(labels), paradigm.device, chunk_size=len(labels))
    scores = similarity_matrix(model, model.encode_images(pixels.to(paradigm.device)), texts, 1)[0]
    return sorted(zip(labels, scores.float().softmax(-1).tolist()), key=lambda pair: -pair[1])


def reply(paradigm: ImageToText, pixels: Tensor, prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The model's answer to ``prompt`` about the image after the (user, assistant) turns of ``history``, through
    the LM's chat template where it has one."""
    return paradigm.generate_text(pixels.to(paradigm.device), [prompt], history=history)[0]


def converse(paradigm: ImageToText, pixels: Tensor, lines: Iterable[str], say: Callable[[str], None]) -> None:
    """A conversation about the image: each line read is the next prompt, answered with the earlier turns as
    history; an empty line or the end of ``lines`` ends it."""
    history: list[tuple[str, str]] = []
    for line in lines:
        prompt = line.strip()
        if not prompt:
            break
        answer = reply(paradigm, pixels, prompt, history)
        say(answer)
        history.append((prompt, answer))
