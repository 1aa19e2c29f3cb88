"""Language retention: does a language model still know what it knew before it learned to see?

Vision training moves an LM's weights (fully fine-tuned) or adds to them (LoRA), and can cost it general
knowledge and fluency (catastrophic forgetting). Two text-only probes, run on the LM alone with the same
prompts before and after training, measure it:

- knowledge: short general-knowledge questions (``retention_data/knowledge.jsonl``, written for this
  project), answered greedily after three short question-answer demonstrations (earlier chat turns; without
  them a chat model answers in sentences) and scored by exact match against the accepted answers, after
  SQuAD-style normalisation (case, punctuation, articles and spacing ignored);
- perplexity: on general English paragraphs (``retention_data/paragraphs.txt``, written for this project).

`LanguageRetention` runs both when fitting starts and when it ends, for any paradigm with a language model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lightning_vlm.data.collate import Collator
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.losses import next_token_loss

log = logging.getLogger(__name__)

PUNCTUATION = frozenset(string.punctuation)
DEFAULT_SYSTEM = "Answer the question with only the answer, in one to three words."
# Few-shot demonstrations, none of them among the questions: they show the answer format, not the facts.
DEMONSTRATIONS = (("What is the capital of Portugal?", "Lisbon"), ("How many wheels does a bicycle have?", "two"),
                  ("What colour is fresh snow?", "white"))


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]


def load_questions(path: str | Path | None = None) -> list[Question]:
    """The general-knowledge questions: a jsonl of {"question", "answers"} (default: the packaged set)."""
    text = Path(path).read_text() if path else _packaged("knowledge.jsonl")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Question(row["question"], tuple(row["answers"])) for row in rows]


def load_paragraphs(path: str | Path | None = None) -> list[str]:
    """The English paragraphs, separated by blank lines (default: the packaged set)."""
    text = Path(path).read_text() if path else _packaged("paragraphs.txt")
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(generated: str, answers: tuple[str, ...] | list[str]) -> bool:
    return normalize_answer(generated) in {normalize_answer(answer) for answer in answers}


@torch.no_grad()
def answer_questions(lm: LanguageModel, questions: list[str], system: str = DEFAULT_SYSTEM,
                     batch_size: int = 16, max_new_tokens: int = 12) -> list[str]:
    """The LM's greedy answers, each prompt laid out as the LM reads prompts (its chat template if it has one)."""
    collator, device, answers = Collator(lm.tokenizer), lm.model.device, []
    for start in range(0, len(questions), batch_size):
        ids, mask = collator.prompts(questions[start:start + batch_size], system, DEMONSTRATIONS)
        new = lm.generate(lm.embed(ids.to(device)), mask.to(device), max_new_tokens=max_new_tokens, do_sample=False)
        answers += [text.strip() for text in lm.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def perplexity(lm: LanguageModel, paragraphs: list[str]) -> float:
    """exp of the mean next-token loss over every token of every paragraph (each starts from BOS if the
    tokenizer has one)."""
    tok, device = lm.tokenizer, lm.model.device
    total_nll, total_tokens = 0.0, 0
    for paragraph in paragraphs:
        ids = tok.encode(paragraph, add_special_tokens=False)
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        ids_t = torch.tensor([ids], device=device)
        total_nll += next_token_loss(lm(lm.embed(ids_t), torch.ones_like(ids_t), ids_t)).item() * (len(ids) - 1)
        total_tokens += len(ids) - 1
    return math.exp(total_nll / total_tokens)


@dataclass
class RetentionProbe:
    """Both probes on one LM; `run` returns {"knowledge": exact-match accuracy, "perplexity": ...} and keeps
    the generated answers of its last run in `answers`."""

    questions: list[Question] = field(default_factory=load_questions)
    paragraphs: list[str] = field(default_factory=load_paragraphs)
    system: str = DEFAULT_SYSTEM
    answers: list[str] = field(default_factory=list)

    def run(self, lm: LanguageModel) -> dict[str, float]:
        was_training = lm.training
        lm.eval()
        try:
            self.answers = answer_questions(lm, [q.question for q in self.questions], self.system)
            hits = [exact_match(a, q.answers) for a, q in zip(self.answers, self.questions)]
            return {"knowledge": sum(hits) / len(hits), "perplexity": perplexity(lm, self.paragraphs)}
        finally:
            lm.train(was_training)


class LanguageRetention(Callback):
    """Runs the `RetentionProbe` on the paradigm's language model (``lm_path``, a dotted attribute path) when
    fitting starts and when it ends; logs ``retention/{knowledge,perplexity}_{before,after}`` and writes them,
    with every question's answers before and after, to ``retention.json`` in the run's log directory."""

    def __init__(self, lm_path: str = "model.language_model", questions: str | None = None,
                 paragraphs: str | None = None, system: str = DEFAULT_SYSTEM) -> None:
        self.lm_path = lm_path
        self.probe = RetentionProbe(load_questions(questions), load_paragraphs(paragraphs), system)
        self.before: dict[str, Any] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.before:  # a resumed run keeps the numbers of the LM it started from
            self.before = self._measure(trainer, pl_module, "before")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        after = self._measure(trainer, pl_module, "after")
        if trainer.is_global_zero and trainer.log_dir:
            rows = [{"question": q.question, "answers": list(q.answers), "before": b, "after": a}
                    for q, b, a in zip(self.probe.questions, self.before["answers"], after["answers"])]
            summary = {f"{name}_{when}": values[name] for when, values in (("before", self.before), ("after", after))
                       for name in ("knowledge", "perplexity")}
            Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.log_dir) / "retention.json").write_text(json.dumps({**summary, "questions": rows}, indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before", {})

    def _measure(self, trainer: Trainer, pl_module: LightningModule, when: str) -> dict[str, Any]:
        lm = pl_module
        for name in self.lm_path.split("."):
            lm = getattr(lm, name)
        metrics = self.probe.run(lm)
        log.warning("language retention %s training: knowledge exact match %.3f (%d questions), perplexity %.2f",
                    when, metrics["knowledge"], len(self.probe.questions), metrics["perplexity"])
        for logger in trainer.loggers:
            logger.log_metrics({f"retention/{k}_{when}": v for k, v in metrics.items()}, step=trainer.global_step)
        return {**metrics, "answers": list(self.probe.answers)}


def _packaged(name: str) -> str:
    return resources.files("lightning_vlm.eval").joinpath("retention_data", name).read_text()
