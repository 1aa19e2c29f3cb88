"""Chat-template label masks on the real SmolLM2 tokenizer: exactly the assistant's reply tokens (and each
reply's end-of-turn token) carry labels, token by token, for one turn and for two."""

from __future__ import annotations

import pytest

from lightning_vlm.data.chat import chat_ids, render
from lightning_vlm.data.collate import Collator
from lightning_vlm.data.tasks import TextExample
from lightning_vlm.tokens import IGNORE_INDEX, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(real_checkpoints):
    return load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled positions, checking that each label equals its token (unshifted)."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def test_one_turn_labels_exactly_the_answer_and_its_end_of_turn(tokenizer):
    ids, labels = chat_ids(tokenizer, [("What colour is the square?", "red")], system="Answer in one word.")
    assert len(ids) == len(labels)
    assert labelled_runs(ids, labels) == [tokenizer.encode("red", add_special_tokens=False) + [tokenizer.eos_token_id]]
    unlabelled = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "Answer in one word." in unlabelled and "What colour is the square?" in unlabelled
    assert tokenizer.decode(ids).count("<|im_start|>assistant") == 1


def test_two_turns_label_both_replies_and_nothing_between(tokenizer):
    turns = [("What colour is the square?", "red"), ("How many objects are there?", "two objects")]
    ids, labels = chat_ids(tokenizer, turns)
    assert labelled_runs(ids, labels) == [
        tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id] for _, answer in turns]
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    assert ids == render(tokenizer, messages)  # the template's own rendering of the whole chat


def test_the_collator_uses_the_chat_template_and_generation_prompts_end_at_the_assistant_turn(tokenizer):
    collate = Collator(tokenizer, max_length=128)
    ids, labels = collate.encode(TextExample("vqa", "What shape is the red object?", "circle", system="Be brief."))
    assert (ids, labels) == tuple(chat_ids(tokenizer, [("What shape is the red object?", "circle")], "Be brief."))
    prompt_ids, mask = collate.prompts(["What shape is it?", "Which colour?"], system="Be brief.")
    assert (prompt_ids[:, -1] == prompt_ids[0, -1]).all() and mask[:, -1].all()  # left-padded, aligned ends
    assert tokenizer.decode(prompt_ids[1][mask[1].bool()]).endswith("<|im_start|>assistant\n")
