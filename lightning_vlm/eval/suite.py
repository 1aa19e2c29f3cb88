"""The paradigm-agnostic evaluation suite for image-text scoring models: retrieval, zero-shot, attribute binding.

Any `Retriever` is scored the same way; every evaluator a paradigm keeps per split is an `Evaluator`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_vlm.distributed import gather_objects
from lightning_vlm.eval.binding import binding_accuracy
from lightning_vlm.eval.retrieval import retrieval_recall
from lightning_vlm.eval.zero_shot import (
    Repr,
    Tokenize,
    caption_templates,
    concat_reprs,
    device_of,
    encode_texts,
    map_repr,
    paired_similarity,
    prediction_accuracy,
    select_rows,
    similarity_matrix,
    zero_shot_predictions,
)


class Retriever(Protocol):
    """What the suite asks of a model it scores (dual encoders, Llip, the masked models, BLIP-2, CoCa)."""

    def encode_images(self, pixel_values: Tensor) -> Any:
        """(N, 3, H, W) -> image representations batched along dim 0 (a Tensor or a tuple of Tensors)."""

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) -> (N, E) text representations."""

    def similarity(self, image_repr: Any, text_repr: Tensor) -> Tensor:
        """(N_img, N_txt) scores exactly as training sees them."""


class Evaluator(Protocol):
    """What a paradigm keeps per eval split (`VLMParadigm.evaluators`): fed every batch until `full`, then computed
    into ``{split}/{metric}`` values and reset for the next evaluation. `groups` names the yardstick groups its
    metrics belong to (lightning_vlm/compare/config.py)."""

    groups: tuple[str, ...]

    @property
    def full(self) -> bool: ...

    def update(self, model: Any, batch: dict[str, Any]) -> None: ...

    def compute(self, model: Any, split: str) -> dict[str, float]: ...

    def reset(self) -> None: ...


class ContrastiveEvaluator:
    """Accumulates image representations and sample metas over an eval loader; ``compute`` scores them all at once.

    Representations stay on the model's device (``max_samples`` bounds them) and must be a Tensor or a tuple of
    Tensors batched along dim 0; text representations are concatenated across chunks, so they must not depend on
    the padded length. Colour and shape classes default to the values seen in the evaluated samples, and their
    prompts to the captions' wording with the other attributes (and the written word) filled in
    (`caption_templates`), a class scoring its best template; given templates are averaged, as CLIP does.
    """

    groups = ("retrieval", "zero_shot", "binding")

    def __init__(
        self,
        tokenize: Tokenize,
        max_samples: int | None = None,
        colors: Sequence[str] | None = None,
        shapes: Sequence[str] | None = None,
        color_templates: Sequence[str] | None = None,
        shape_templates: Sequence[str] | None = None,
        chunk_size: int = 256,
    ) -> None:
        self.tokenize = tokenize
        self.max_samples = max_samples
        self.classes = {"color": colors, "shape": shapes}
        self.templates = {"color": color_templates, "shape": shape_templates}
        self.chunk_size = chunk_size
        self.reset()

    @property
    def full(self) -> bool:
        """Whether ``max_samples`` samples are held already."""
        return self.max_samples is not None and len(self.metas) >= self.max_samples

    def reset(self) -> None:
        """Forget every accumulated sample."""
        self.image_reprs: list[Repr] = []
        self.metas: list[dict[str, Any]] = []

    @torch.no_grad()
    def update(self, model: Any, batch: dict[str, Any]) -> None:
        """Encode a batch's images and keep them with the batch's metas, up to ``max_samples`` in all."""
        room = len(batch["meta"]) if self.max_samples is None else self.max_samples - len(self.metas)
        if room > 0:
            self.image_reprs.append(map_repr(model.encode_images(batch["pixel_values"][:room]), full_precision))
            self.metas.extend(batch["meta"][:room])

    @torch.no_grad()
    def compute(self, model: Any, split: str) -> dict[str, float]:
        """Retrieval recall@1/5/10 both ways, zero-shot colour and shape accuracy (with the number of images
        evaluated) and binding accuracy, keyed ``{split}/{name}``; parts the metas cannot support are left out."""
        if not self.metas:
            raise ValueError("ContrastiveEvaluator.compute called before any update")
        self._gather_ranks()
        images = concat_reprs(self.image_reprs)
        captions = [meta["caption"] for meta in self.metas]
        metrics = self._retrieval(model, images, captions)
        metrics.update(self._binding(model, images))
        for attribute in ("color", "shape"):
            metrics.update(self._zero_shot(model, images, attribute))
        return {f"{split}/{name}": value for name, value in metrics.items()}

    def _gather_ranks(self) -> None:
        """Under DDP every rank holds part of the split: collect all of it, so every rank scores the whole gallery."""
        device = device_of(concat_reprs(self.image_reprs))
        parts = gather_objects(([move_repr(r, "cpu") for r in self.image_reprs], self.metas))
        if parts is None:
            return
        self.image_reprs = [move_repr(r, device) for reprs, _ in parts for r in reprs]
        self.metas = [meta for _, metas in parts for meta in metas]

    def _retrieval(self, model: Any, images: Repr, captions: list[str]) -> dict[str, float]:
        """Recall@K against the distinct captions: copies of one synthetic caption would otherwise fill a top K."""
        distinct = list(dict.fromkeys(captions))
        text_repr = encode_texts(model, self.tokenize, distinct, device_of(images), self.chunk_size)
        return retrieval_recall(similarity_matrix(model, images, text_repr, self.chunk_size), captions, distinct)

    def _binding(self, model: Any, images: Repr) -> dict[str, float]:
        """Binding accuracy over every (image, hard negative) pair; the true and negative captions of a pair are
        encoded and scored side by side, so a model blind to the swap ties exactly."""
        pairs = [
            (i, meta["caption"], neg["caption"], neg["kind"])
            for i, meta in enumerate(self.metas)
            for neg in meta.get("hard_negatives", [])
        ]
        if not pairs:
            return {}
        rows, true_captions, negatives, kinds = zip(*pairs)
        texts = [text for pair in zip(true_captions, negatives) for text in pair]
        text_repr = encode_texts(model, self.tokenize, texts, device_of(images), self.chunk_size)
        image_rows = torch.tensor(rows, device=device_of(images)).repeat_interleave(2)
        scores = paired_similarity(model, select_rows(images, image_rows), text_repr, self.chunk_size).view(-1, 2)
        return binding_accuracy(scores[:, 0], scores[:, 1], kinds)

    def _zero_shot(self, model: Any, images: Repr, attribute: str) -> dict[str, float]:
        """Zero-shot accuracy of `zero_shot_task`'s images by embedding similarity."""
        task = zero_shot_task(self.metas, attribute, self.classes[attribute], self.templates[attribute])
        if task is None:
            return {}
        rows = select_rows(images, torch.tensor(task.rows, device=device_of(images)))
        predictions = zero_shot_predictions(model, self.tokenize, rows, task.classes, task.templates, self.chunk_size,
                                            task.reduction)
        return task.metrics(predictions)


@dataclass
class ZeroShotTask:
    """One zero-shot question over a set of samples: the rows whose objects all share one value of `attribute`
    (their `target` class), the classes, the candidate templates and how a class combines its templates ("max" for
    the benchmark's own wording, whose other attributes must not vote; "mean" for given templates, as CLIP)."""

    attribute: str
    rows: list[int]
    target: list[int]
    multi: list[bool]
    classes: list[str]
    templates: list[str]
    reduction: str

    def metrics(self, predictions: Tensor) -> dict[str, float]:
        """Accuracy and count, then the same on the rows holding several objects (``_multi``), where a one-object
        prompt describes only part of the scene (docs/results/contrastive.md, "Where Llip falls short")."""
        target = torch.tensor(self.target, device=predictions.device)
        multi = torch.tensor(self.multi, device=predictions.device)
        name = f"zeroshot_{self.attribute}"
        metrics = {name: prediction_accuracy(predictions, target, len(self.classes)), f"{name}_n": float(len(target))}
        if multi.any():
            metrics[f"{name}_multi"] = prediction_accuracy(predictions[multi], target[multi], len(self.classes))
            metrics[f"{name}_multi_n"] = float(multi.sum())
        return metrics


def zero_shot_task(metas: Sequence[dict[str, Any]], attribute: str, classes: Sequence[str] | None = None,
                   templates: Sequence[str] | None = None) -> ZeroShotTask | None:
    """The zero-shot question about `attribute` that `metas` support (None when no sample has one value of it):
    classes default to the values seen, templates to the captions' wording (`caption_templates`)."""
    labels = [shared_value(meta.get("objects", []), attribute) for meta in metas]
    rows = [i for i, label in enumerate(labels) if label is not None]
    if not rows:
        return None
    objects = [obj for meta in metas for obj in meta.get("objects", [])]
    words = [meta["word"] for meta in metas if meta.get("word")]
    names = list(classes or sorted({obj[attribute] for obj in objects}))
    return ZeroShotTask(attribute, rows, [names.index(labels[i]) for i in rows],
                        [len(metas[i]["objects"]) > 1 for i in rows], names,
                        list(templates or caption_templates(attribute, objects, words)),
                        "mean" if templates else "max")


def move_repr(repr_: Repr, device: torch.device | str) -> Repr:
    """A representation (Tensor or tuple of Tensors) on `device`."""
    return map_repr(repr_, lambda part: part.to(device))


def full_precision(part: torch.Tensor) -> torch.Tensor:
    """Floating tensors in float32: images encoded under bf16 autocast are scored against texts encoded outside it."""
    return part.float() if part.is_floating_point() else part


def shared_value(objects: Sequence[dict[str, Any]], attribute: str) -> str | None:
    """The value of ``attribute`` shared by all ``objects``; None when they differ or there are none."""
    values = {obj[attribute] for obj in objects}
    return values.pop() if len(values) == 1 else None
