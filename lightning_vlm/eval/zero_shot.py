"""Zero-shot classification from prompt templates, for any `Retriever` (eval/suite.py).

Scores, not text embeddings, are averaged over templates, because ``encode_texts`` need not return a plain
normalised tensor (Llip conditions the image on the caption inside ``similarity``); a model whose
``averages_templates`` is True (the authors' Llip) has its text representations averaged instead, scored once per
class. The helpers below handle representations generically: a Tensor, or a tuple (or namedtuple) of Tensors, every
one batched along dim 0.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_vlm.data.synthetic.language import OBJECT_PHRASE, WORD_SENTENCE

Repr = Tensor | tuple[Tensor, ...]
Tokenize = Callable[[list[str]], tuple[Tensor, Tensor]]


def caption_templates(attribute: str, objects: Sequence[dict[str, Any]], words: Sequence[str] = ()) -> list[str]:
    """Prompts in the benchmark's own wording: "a {size} {color} {shape}." with `attribute` left open and the other
    two slots filled with every value seen among `objects`, each also followed by "the word {w} is written." for
    every seen word in `words` (every caption of an image with a word says it). Only one of them describes a given
    image, so score them with ``reduction="max"``."""
    others = [slot for slot in ("size", "color", "shape") if slot != attribute]
    values = [sorted({obj[slot] for obj in objects}) for slot in others]
    objects_only = [OBJECT_PHRASE.format(**dict(zip(others, combo)), **{attribute: "{}"}) + "."
                    for combo in itertools.product(*values)]
    word_sentences = [" " + WORD_SENTENCE.format(word.replace("{", "{{").replace("}", "}}")) + "."
                      for word in sorted(set(words))]
    return objects_only + [template + sentence for template in objects_only for sentence in word_sentences]


@torch.no_grad()
def zero_shot_accuracy(
    model: Any,
    tokenize: Tokenize,
    image_repr: Repr,
    targets: Sequence[str],
    classes: Sequence[str],
    templates: Sequence[str],
    chunk_size: int = 256,
    reduction: str = "mean",
) -> float:
    """Accuracy of predicting each image's class as the argmax over classes of its score over templates
    (`zero_shot_predictions`)."""
    predictions = zero_shot_predictions(model, tokenize, image_repr, classes, templates, chunk_size, reduction)
    target = torch.tensor([classes.index(name) for name in targets], device=predictions.device)
    return prediction_accuracy(predictions, target, len(classes))


def prediction_accuracy(predictions: Tensor, target: Tensor, num_classes: int) -> float:
    """The fraction of class indices ``predictions`` equal to ``target``."""
    return multiclass_accuracy(predictions, target, num_classes, average="micro").item()


@torch.no_grad()
def zero_shot_predictions(
    model: Any,
    tokenize: Tokenize,
    image_repr: Repr,
    classes: Sequence[str],
    templates: Sequence[str],
    chunk_size: int = 256,
    reduction: str = "mean",
) -> Tensor:
    """(N,) index into ``classes`` of each image's best class, a class scoring the mean or max over templates.

    ``reduction="mean"`` is CLIP's prompt ensembling, for templates that say nothing else about the image ("a photo
    of a {}."). ``"max"`` scores a class by its best-matching template, for templates that also name other
    attributes ("a small red {}."): the attributes the image does not have must not vote. Under "mean", a model with
    ``averages_templates`` is scored once per class, on its text representations averaged over the templates.
    """
    if reduction not in ("mean", "max"):
        raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")
    texts = [template.format(name) for template in templates for name in classes]
    text_repr = encode_texts(model, tokenize, texts, device_of(image_repr), chunk_size)
    if reduction == "mean" and getattr(model, "averages_templates", False):
        class_repr = map_repr(text_repr, lambda part: part.unflatten(0, (len(templates), len(classes))).mean(dim=0))
        return similarity_matrix(model, image_repr, class_repr, chunk_size).argmax(dim=1)
    scores = similarity_matrix(model, image_repr, text_repr, chunk_size).unflatten(1, (len(templates), len(classes)))
    class_scores = scores.float().mean(dim=1) if reduction == "mean" else scores.float().amax(dim=1)
    return class_scores.argmax(dim=1)


@torch.no_grad()
def encode_texts(model: Any, tokenize: Tokenize, texts: Sequence[str], device: torch.device, chunk_size: int) -> Repr:
    """Encode ``texts`` in chunks through ``tokenize`` and ``model.encode_texts``, concatenated along dim 0."""
    reprs = []
    for start in range(0, len(texts), chunk_size):
        input_ids, attention_mask = tokenize(list(texts[start : start + chunk_size]))
        reprs.append(model.encode_texts(input_ids.to(device), attention_mask.to(device)))
    return concat_reprs(reprs)


@torch.no_grad()
def similarity_matrix(model: Any, image_repr: Repr, text_repr: Repr, chunk_size: int) -> Tensor:
    """``model.similarity`` of every image with every text (N_img, N_txt), in chunks of images to bound memory."""
    starts = range(0, num_rows(image_repr), chunk_size)
    return torch.cat([model.similarity(select_rows(image_repr, slice(s, s + chunk_size)), text_repr) for s in starts])


@torch.no_grad()
def paired_similarity(model: Any, image_repr: Repr, text_repr: Repr, chunk_size: int) -> Tensor:
    """Scores of aligned pairs, image i with text i (N,): the diagonal of ``similarity``, chunk by chunk."""
    chunks = (slice(s, s + chunk_size) for s in range(0, num_rows(image_repr), chunk_size))
    return torch.cat(
        [model.similarity(select_rows(image_repr, c), select_rows(text_repr, c)).diagonal() for c in chunks]
    )


def concat_reprs(reprs: Sequence[Repr]) -> Repr:
    """Concatenate batched representations along dim 0, part by part for tuples."""
    return _rebuild(reprs[0], [torch.cat(parts) for parts in zip(*map(_parts, reprs))])


def select_rows(repr: Repr, index: Tensor | slice) -> Repr:
    """Rows ``index`` (dim 0) of a representation, part by part for tuples."""
    return _rebuild(repr, [part[index] for part in _parts(repr)])


def num_rows(repr: Repr) -> int:
    """Batch size (dim 0) of a representation."""
    return len(_parts(repr)[0])


def device_of(repr: Repr) -> torch.device:
    """Device of a representation (of its first part for tuples)."""
    return _parts(repr)[0].device


def map_repr(repr: Repr, fn: Callable[[Tensor], Tensor]) -> Repr:
    """``fn`` applied to every tensor of a representation, its kind (Tensor, tuple, namedtuple) kept."""
    return _rebuild(repr, [fn(part) for part in _parts(repr)])


def _parts(repr: Repr) -> list[Tensor]:
    """The tensors making up a representation; a clear error for anything else."""
    parts = [repr] if isinstance(repr, Tensor) else list(repr) if isinstance(repr, tuple) else []
    if not parts or not all(isinstance(part, Tensor) for part in parts):
        raise TypeError(f"a representation must be a Tensor or a non-empty tuple of Tensors, got {type(repr).__name__}")
    return parts


def _rebuild(like: Repr, parts: list[Tensor]) -> Repr:
    """A representation of the same kind as ``like`` (Tensor, tuple or namedtuple) made of ``parts``."""
    if isinstance(like, Tensor):
        return parts[0]
    return type(like)(*parts) if hasattr(like, "_fields") else tuple(parts)
