"""The frozen-feature probe: what a trained image encoder's features can answer, skill by skill, read by the same
small probe trained the same way for every model (the yardstick's ``probe`` group; ``python -m lightning_vlm probe``).

The encoder encodes N training images once; for each skill of the benchmark's questions (colour, shape, count,
spatial, text, existence) an attention probe queried by the question's words learns the answer from the frozen
features alone, and is scored on each eval split's questions. It measures what the features carry, whatever reads
them in the model (a projector, a Q-Former, an LM), so a contrastive and a generative model share the column.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SKILLS = ("color", "shape", "count", "spatial", "text", "existence")
MAX_WORDS = 12  # the benchmark's questions have at most 9 words


class AttentionProbe(nn.Module):
    """The question's words (by position, so "is the A left of the B" differs from "is the B left of the A") as one
    query, two cross-attention layers over the image's tokens and pooled vector, an MLP to the answers."""

    def __init__(self, num_words: int, num_answers: int, width: int, num_tokens: int, hidden: int = 256) -> None:
        super().__init__()
        self.words = nn.Embedding(num_words, hidden, padding_idx=0)
        self.question = nn.Linear(MAX_WORDS * hidden, hidden)
        self.tokens = nn.Linear(width, hidden)
        self.positions = nn.Parameter(torch.zeros(num_tokens, hidden))
        self.attention = nn.ModuleList(nn.MultiheadAttention(hidden, 4, batch_first=True) for _ in range(2))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                  nn.Linear(2 * hidden, num_answers))

    def forward(self, features: Tensor, question: Tensor) -> Tensor:
        """(B, T, width) features and (B, MAX_WORDS) word ids -> (B, num_answers) logits."""
        context = self.tokens(features) + self.positions
        query = self.question(self.words(question).flatten(1))[:, None]
        for attention in self.attention:
            query = query + attention(query, context, context, need_weights=False)[0]
        return self.head(query[:, 0])


@dataclass
class EncodedSplit:
    """A split's images encoded once: (N, T, width) float32 features (tokens, then the pooled vector) and metas."""

    features: Tensor
    metas: list[dict]


@dataclass
class SkillQuestions:
    """Every question of one skill over a split: its image row, its words as ids, its answer's id (-1: an answer
    never seen in training, which the probe cannot give)."""

    rows: Tensor
    words: Tensor
    answers: Tensor


@torch.no_grad()
def encode_split(vision: nn.Module, loader: Iterable[dict], count: int | None = None) -> EncodedSplit:
    """The first `count` images of a loader (all when None) through a vision encoder returning `VisionOutput`."""
    features, metas = [], []
    for batch in loader:
        out = vision(batch["pixel_values"])
        features.append(torch.cat([out.tokens, out.pooled[:, None]], 1).float().cpu())
        metas += batch["meta"]
        if count is not None and len(metas) >= count:
            break
    return EncodedSplit(torch.cat(features)[:count], metas[:count])


def words_of(question: str) -> list[str]:
    return re.findall(r"[a-z]+", question.lower())


class Vocabulary:
    """Question words and each skill's answers as seen in the training questions (id 0 pads words)."""

    def __init__(self, metas: Sequence[dict]) -> None:
        qa = [pair for meta in metas for pair in meta.get("qa", [])]
        self.words = {word: i + 1 for i, word in enumerate(sorted({w for p in qa for w in words_of(p["question"])}))}
        self.answers = {skill: sorted({p["answer"] for p in qa if p.get("skill") == skill}) for skill in SKILLS}

    def questions(self, metas: Sequence[dict], skill: str) -> SkillQuestions | None:
        """Every `skill` question of `metas`, encoded; None when there is none or training saw none."""
        answers = self.answers[skill]
        found = [(row, pair) for row, meta in enumerate(metas) for pair in meta.get("qa", []) if pair["skill"] == skill]
        if not found or not answers:
            return None
        words = torch.zeros(len(found), MAX_WORDS, dtype=torch.long)
        for i, (_, pair) in enumerate(found):
            ids = [self.words.get(word, 0) for word in words_of(pair["question"])][:MAX_WORDS]
            words[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        answer_ids = [answers.index(p["answer"]) if p["answer"] in answers else -1 for _, p in found]
        return SkillQuestions(torch.tensor([row for row, _ in found]), words, torch.tensor(answer_ids))


def train_probe(train: EncodedSplit, questions: SkillQuestions, num_words: int, num_answers: int, epochs: int,
                batch_size: int = 256, lr: float = 1e-3) -> AttentionProbe:
    """A fresh probe fitted to `questions` over `train`'s features by AdamW (the same schedule for every model)."""
    features = train.features
    probe = AttentionProbe(num_words, num_answers, features.shape[-1], features.shape[1])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    for _ in range(epochs):
        for chunk in torch.randperm(len(questions.rows)).split(batch_size):
            logits = probe(features[questions.rows[chunk]], questions.words[chunk])
            loss = F.cross_entropy(logits, questions.answers[chunk])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: AttentionProbe, split: EncodedSplit, questions: SkillQuestions) -> float:
    predictions = torch.cat([probe(split.features[rows], words).argmax(1) for rows, words in
                             zip(questions.rows.split(1024), questions.words.split(1024))])
    return (predictions == questions.answers).float().mean().item()


def probe_skills(train: EncodedSplit, evaluated: dict[str, EncodedSplit], epochs: int = 20,
                 seed: int = 0) -> dict[str, float]:
    """``{split}/probe_{skill}`` accuracy of a probe per skill, trained on `train` from `seed` (the global random
    state is left as it was), with ``_n`` (the questions scored) and ``_prior`` (the accuracy of always giving the
    commonest training answer: what a probe that reads nothing gets)."""
    vocabulary = Vocabulary(train.metas)
    metrics: dict[str, float] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for skill in SKILLS:
            questions = vocabulary.questions(train.metas, skill)
            if questions is None:
                continue
            probe = train_probe(train, questions, len(vocabulary.words) + 1, len(vocabulary.answers[skill]), epochs)
            for name, split in evaluated.items():
                asked = vocabulary.questions(split.metas, skill)
                if asked is not None:
                    metrics[f"{name}/probe_{skill}"] = probe_accuracy(probe, split, asked)
                    metrics[f"{name}/probe_{skill}_n"] = float(len(asked.rows))
                    commonest = questions.answers.mode().values
                    metrics[f"{name}/probe_{skill}_prior"] = (asked.answers == commonest).float().mean().item()
    return metrics
