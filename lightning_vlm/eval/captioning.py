"""Text-generation metrics: CIDEr-D (a torchmetrics Metric), BLEU-4 and exact-match answer accuracy per skill.

CIDEr-D is written by hand (torchmetrics has none); it follows the reference implementation used by COCO
caption evaluation (pycocoevalcap's cider_scorer), quirks included, so scores are comparable with papers:
TF-IDF n-gram vectors (n = 1..4) with document frequencies over the references of the evaluated set,
clipped cosine similarity, a Gaussian length penalty (sigma 6) whose "length" counts the bigrams, x10.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import BLEUScore

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: how captions and answers are compared."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def ngram_counts(text: str, n_max: int = 4) -> Counter:
    """Counts of every n-gram (n = 1..n_max) of a normalised text, keyed by word tuples."""
    words = normalize_text(text).split()
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


class CIDErD(Metric):
    """CIDEr-D of generated captions against one or more references each; ``compute`` scores the whole set
    (document frequencies come from all references seen, so it is a corpus-level metric)."""

    full_state_update = False

    def __init__(self, n_max: int = 4, sigma: float = 6.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_max, self.sigma = n_max, sigma
        self.add_state("candidates", default=[], dist_reduce_fx="cat")
        self.add_state("references", default=[], dist_reduce_fx="cat")

    def update(self, candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        self.candidates.extend(candidates)
        self.references.extend([refs] if isinstance(refs, str) else list(refs) for refs in references)

    def compute(self) -> torch.Tensor:
        if not self.candidates:
            return torch.tensor(0.0)
        return torch.tensor(sum(self.scores()) / len(self.candidates))

    def scores(self) -> list[float]:
        """CIDEr-D of each candidate."""
        refs = [[ngram_counts(r, self.n_max) for r in group] for group in self.references]
        document_frequency: Counter = Counter()
        for group in refs:
            document_frequency.update({gram for counts in group for gram in counts})
        log_documents = math.log(float(len(refs)))

        def vector(counts: Counter):
            vec, norm, length = [defaultdict(float) for _ in range(self.n_max)], [0.0] * self.n_max, 0
            for gram, tf in counts.items():
                n = len(gram) - 1
                vec[n][gram] = tf * (log_documents - math.log(max(1.0, document_frequency[gram])))
                norm[n] += vec[n][gram] ** 2
                if n == 1:  # the reference implementation's "length" counts bigrams
                    length += tf
            return vec, [math.sqrt(x) for x in norm], length

        out = []
        for candidate, group in zip(self.candidates, refs):
            vec, norm, length = vector(ngram_counts(candidate, self.n_max))
            total = 0.0
            for ref_counts in group:
                ref_vec, ref_norm, ref_length = vector(ref_counts)
                penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
                for n in range(self.n_max):
                    value = sum(min(v, ref_vec[n][g]) * ref_vec[n][g] for g, v in vec[n].items())
                    if norm[n] and ref_norm[n]:
                        value /= norm[n] * ref_norm[n]
                    total += value * penalty / self.n_max
            out.append(10.0 * total / len(group))
        return out


def bleu4(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU-4 (torchmetrics) over normalised texts."""
    refs = [[normalize_text(r)] if isinstance(r, str) else [normalize_text(x) for x in r] for r in references]
    return BLEUScore(n_gram=4)([normalize_text(c) for c in candidates], refs).item()


def answer_accuracy(predictions: Sequence[str], answers: Sequence[str], skills: Sequence[str | None]) -> dict:
    """Exact match of normalised answers, overall ("all") and per skill."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for prediction, answer, skill in zip(predictions, answers, skills):
        hit = normalize_text(prediction) == normalize_text(answer)
        hits["all"].append(hit)
        if skill:
            hits[skill].append(hit)
    return {skill: sum(v) / len(v) for skill, v in hits.items()}
