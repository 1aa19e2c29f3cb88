"""Language retention probes: answer normalisation, exact match, perplexity against its definition, and the
callback's before/after numbers (equal when the LM is frozen, different when it is trained)."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lightning_vlm.adapters import MLP
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.eval.retention import (
    LanguageRetention,
    Question,
    RetentionProbe,
    exact_match,
    load_paragraphs,
    load_questions,
    normalize_answer,
    perplexity,
)
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.paradigms.generative import ImageToText

TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}


def test_packaged_probe_sets_are_big_enough_and_well_formed():
    questions, paragraphs = load_questions(), load_paragraphs()
    assert len(questions) >= 50 and len({q.question for q in questions}) == len(questions)
    assert all(q.answers and all(normalize_answer(a) for a in q.answers) for q in questions)
    assert len(paragraphs) >= 5 and all(len(p.split()) > 40 for p in paragraphs)


def test_exact_match_ignores_case_punctuation_articles_and_spacing_only():
    assert normalize_answer("  The  Blue-Whale. ") == "bluewhale"
    assert exact_match("Paris.", ("Paris",)) and exact_match("the Nile", ("Nile",))
    assert not exact_match("The capital of France is Paris.", ("Paris",))
    assert not exact_match("Parish", ("Paris",))


def test_perplexity_is_exp_of_mean_token_loss(tiny_benchmark):
    torch.manual_seed(0)
    lm = LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM).eval()
    paragraphs = ["a small red circle left of a large blue square", "two green stars"]
    nll, count = 0.0, 0
    for text in paragraphs:
        ids = torch.tensor([[lm.tokenizer.bos_token_id] + lm.tokenizer.encode(text, add_special_tokens=False)])
        logits = lm.model(input_ids=ids).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert perplexity(lm, paragraphs) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_probe_scores_the_lms_own_answers(tiny_benchmark, monkeypatch):
    lm = LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM)
    questions = [Question("q1", ("red",)), Question("q2", ("two", "2")), Question("q3", ("circle",))]
    monkeypatch.setattr("lightning_vlm.eval.retention.answer_questions", lambda *a, **k: ["Red.", "2", "square"])
    metrics = RetentionProbe(questions, ["a red circle"]).run(lm)
    assert metrics["knowledge"] == pytest.approx(2 / 3) and metrics["perplexity"] > 1


def _fit_llava(root: str, tmp_path, lm_frozen: bool) -> LanguageRetention:
    torch.manual_seed(0)
    model = LLaVA(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  LanguageModel(tokenizer=root, config=TINY_LM), MLP())
    if lm_frozen:
        model.language_model.requires_grad_(False)
    retention = LanguageRetention(questions=None, paragraphs=None)
    retention.probe.questions = retention.probe.questions[:4]
    retention.probe.paragraphs = retention.probe.paragraphs[:1]
    paradigm = ImageToText(model, lr=1e-2, warmup_steps=1)
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_progress_bar=False, enable_checkpointing=False, callbacks=[retention])
    trainer.fit(paradigm, ShardDataModule(root=root, tasks={"caption": 1.0, "vqa": 1.0}, batch_size=8))
    return json.loads((tmp_path / "lightning_logs" / "version_0" / "retention.json").read_text())


def test_retention_callback_before_equals_after_for_a_frozen_lm(tiny_benchmark, tmp_path):
    report = _fit_llava(tiny_benchmark, tmp_path, lm_frozen=True)
    assert report["perplexity_before"] == report["perplexity_after"]
    assert report["knowledge_before"] == report["knowledge_after"]
    assert len(report["questions"]) == 4 and all(r["before"] == r["after"] for r in report["questions"])


def test_retention_callback_sees_a_trained_lm_change(tiny_benchmark, tmp_path):
    report = _fit_llava(tiny_benchmark, tmp_path, lm_frozen=False)
    assert report["perplexity_before"] != report["perplexity_after"]


def test_retention_command_scores_an_lm_folder_and_writes_every_answer(tiny_benchmark, tmp_path, capsys):
    from lightning_vlm.cli import main

    lm = LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM)
    lm.model.save_pretrained(tmp_path / "lm")
    lm.tokenizer.save_pretrained(tmp_path / "lm")
    assert main(["retention", "--lm", str(tmp_path / "lm"), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["questions"]) == len(load_questions()) and report["perplexity"] > 1
    assert "knowledge exact match" in capsys.readouterr().out
