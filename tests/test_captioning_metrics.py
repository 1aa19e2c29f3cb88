"""CIDEr-D against values computed by hand from its definition; BLEU-4 and per-skill answer accuracy."""

from __future__ import annotations

import math

import pytest

from lightning_vlm.eval.captioning import CIDErD, answer_accuracy, bleu4, normalize_text


def _cider(candidates, references) -> CIDErD:
    metric = CIDErD()
    metric.update(candidates, references)
    return metric


def test_cider_d_by_hand_exact_and_disjoint():
    """Two images, references "a b" and "a c": df(a) = 2, so "a" weighs ln 2 - ln 2 = 0; b, c, (a b), (a c)
    weigh ln 2. "a b" against "a b": cosine 1 on unigrams and bigrams, 0 for n = 3, 4 -> 10 * 2 / 4 = 5.
    "a b" against "a c": no weighted n-gram in common -> 0. Corpus score: 2.5."""
    metric = _cider(["a b", "a b"], ["a b", "a c"])
    assert metric.scores() == [pytest.approx(5.0), pytest.approx(0.0)]
    assert metric.compute().item() == pytest.approx(2.5)


def test_cider_d_by_hand_with_clipping_and_length_penalty():
    """"a b b" against "a b" (other image: "a c"). Unigrams: b has tf 2 -> 2 ln 2 against ln 2; the clipped
    product min(2 ln 2, ln 2) * ln 2 over norms 2 ln 2 * ln 2 = 1/2. Bigrams: (a b) and (b b) (df 0 -> ln 2),
    norm sqrt(2) ln 2; overlap ln 2 * ln 2 -> 1/sqrt(2). Bigram counts 2 vs 1 -> penalty exp(-1 / 72)."""
    expected = 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert _cider(["a b b", "a c"], ["a b", "a c"]).scores()[0] == pytest.approx(expected, rel=1e-9)


def test_cider_d_averages_over_references_and_ignores_case_and_punctuation():
    one = _cider(["A red square.", "a blue circle"], [["a red square", "a red square"], "a blue circle"]).scores()
    two = _cider(["a red square", "a blue circle"], ["a red square", "a blue circle"]).scores()
    assert one == pytest.approx(two)
    with pytest.raises(ValueError, match="reference"):
        CIDErD().update(["a"], [])


def test_bleu4_and_answer_accuracy_per_skill():
    assert bleu4(["a small red square left of a blue circle"], ["a small red square left of a blue circle."]) == \
        pytest.approx(1.0)
    assert bleu4(["a small red square"], ["a large blue circle left of a star"]) < 0.1
    accuracy = answer_accuracy(["Red", "circle", "two"], ["red", "square", "two"], ["color", "shape", "count"])
    assert accuracy == {"all": pytest.approx(2 / 3), "color": 1.0, "shape": 0.0, "count": 1.0}
    assert normalize_text("  What COLOUR is it? ") == "what colour is it"
