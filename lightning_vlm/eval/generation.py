"""Evaluation of generated text for any model that writes captions and answers: CIDEr-D, BLEU-4, VQA accuracy,
grounding accuracy (IoU >= 0.5).

Every generative paradigm gives it its way of answering a batch; tasks come from the batch metas, so one eval
split can mix captioning and question answering. Under DDP the pairs of all ranks are gathered first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_vlm.distributed import gather_objects
from lightning_vlm.eval.captioning import CIDErD, answer_accuracy, bleu4
from lightning_vlm.eval.grounding import grounding_accuracy


class GenerationEvaluator:
    """Accumulates up to ``max_samples`` (task, target, generated) triples, the text from ``answer(batch)`` (each
    sample's reply to its own prompt); ``compute`` scores them. An `Evaluator`."""

    groups = ("vqa", "captioning", "grounding")

    def __init__(self, answer: Callable[[dict[str, Any]], list[str]], max_samples: int | None = None) -> None:
        self.answer = answer
        self.max_samples = max_samples
        self.reset()

    def reset(self) -> None:
        self.records: list[dict[str, Any]] = []

    @property
    def full(self) -> bool:
        return self.max_samples is not None and len(self.records) >= self.max_samples

    def update(self, model: Any, batch: dict[str, Any]) -> None:
        self.add(batch["meta"], self.answer(batch))

    def add(self, metas: list[dict[str, Any]], generated: list[str]) -> None:
        """Keep (meta, generated) pairs up to ``max_samples`` in all."""
        room = len(metas) if self.max_samples is None else self.max_samples - len(self.records)
        for meta, text in list(zip(metas, generated))[:max(0, room)]:
            self.records.append({"task": meta.get("task"), "target": meta.get("target", ""),
                                 "skill": meta.get("skill"), "generated": text, "key": meta.get("key")})

    def compute(self, model: Any, split: str) -> dict[str, float]:
        """``{split}/cider_d``, ``{split}/bleu4`` over captions; ``{split}/vqa_{skill}`` and ``vqa_all`` over
        questions (``chat_*`` over chats' last replies, ``fewshot_*`` over few-shot answers);
        ``{split}/grounding_iou50`` over boxes; parts without samples are left out."""
        self._gather_ranks()
        metrics: dict[str, float] = {}
        if not self.records:
            return metrics
        captions = [r for r in self.records if r["task"] == "caption"]
        if captions:
            candidates, references = [r["generated"] for r in captions], [r["target"] for r in captions]
            cider = CIDErD(sync_on_compute=False)  # the records are every rank's already (_gather_ranks)
            cider.update(candidates, references)
            metrics.update(cider_d=cider.compute().item(), bleu4=bleu4(candidates, references))
        for task in ("vqa", "chat", "fewshot"):  # a chat's last reply, a few-shot example's answer
            questions = [r for r in self.records if r["task"] == task]
            if questions:
                accuracy = answer_accuracy([r["generated"] for r in questions], [r["target"] for r in questions],
                                           [r["skill"] for r in questions])
                metrics.update({f"{task}_{skill}": value for skill, value in accuracy.items()})
        boxes = [r for r in self.records if r["task"] == "grounding"]
        if boxes:
            generated, targets = [r["generated"] for r in boxes], [r["target"] for r in boxes]
            metrics["grounding_iou50"] = grounding_accuracy(generated, targets)
        return {f"{split}/{name}": value for name, value in metrics.items()}

    def _gather_ranks(self) -> None:
        parts = gather_objects(self.records)
        if parts is not None:
            self.records = [record for part in parts for record in part]
