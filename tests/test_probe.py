"""The frozen-feature probe reads what features carry and nothing else: it learns an answer the features hold, and
the order of a question's words; on features that hold nothing it falls to the commonest answer."""

from __future__ import annotations

import torch

from lightning_vlm.eval.probe import EncodedSplit, Vocabulary, probe_skills

NUMBERS = ["one", "two", "three", "four"]


def counting(n: int, informative: bool, seed: int) -> EncodedSplit:
    """n images whose first token holds the object count (or noise), each with the count question."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (n,), generator=generator)
    features = torch.randn(n, 3, 8, generator=generator)
    if informative:
        features[:, 0, :4] = 3 * torch.nn.functional.one_hot(counts, 4).float()
    metas = [{"qa": [{"question": "How many objects are there?", "answer": NUMBERS[c], "skill": "count"}]}
             for c in counts.tolist()]
    return EncodedSplit(features, metas)


def ordered(n: int, seed: int) -> EncodedSplit:
    """Identical images asked "Is the red circle left of the blue square?" or the same words the other way round:
    only the order of the words tells the answer."""
    generator = torch.Generator().manual_seed(seed)
    flips = torch.randint(0, 2, (n,), generator=generator).tolist()
    questions = ["Is the red circle left of the blue square?", "Is the blue square left of the red circle?"]
    metas = [{"qa": [{"question": questions[f], "answer": ["yes", "no"][f], "skill": "spatial"}]} for f in flips]
    return EncodedSplit(torch.ones(n, 2, 4), metas)


def test_the_probe_reads_an_answer_the_features_hold():
    metrics = probe_skills(counting(512, True, 0), {"val": counting(256, True, 1)}, epochs=15)
    assert metrics["val/probe_count"] > 0.95 and metrics["val/probe_count_n"] == 256
    assert set(metrics) == {"val/probe_count", "val/probe_count_n", "val/probe_count_prior"}


def test_on_features_that_hold_nothing_the_probe_is_no_better_than_the_commonest_answer():
    metrics = probe_skills(counting(512, False, 0), {"val": counting(256, False, 1)}, epochs=15)
    assert metrics["val/probe_count"] < metrics["val/probe_count_prior"] + 0.1


def test_the_question_is_read_in_order():
    metrics = probe_skills(ordered(256, 0), {"val": ordered(128, 1)}, epochs=15)
    assert metrics["val/probe_spatial"] == 1.0


def test_answers_never_seen_in_training_count_as_wrong_and_the_global_random_state_is_kept():
    vocabulary = Vocabulary(counting(64, True, 0).metas)
    unseen = [{"qa": [{"question": "How many objects are there?", "answer": "nine", "skill": "count"}]}]
    assert vocabulary.questions(unseen, "count").answers.tolist() == [-1]
    assert vocabulary.questions(unseen, "color") is None
    state = torch.random.get_rng_state()
    probe_skills(counting(64, True, 0), {"val": counting(8, True, 1)}, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)
