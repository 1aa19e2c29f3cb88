"""Offline pretrained parts: preparing a packaged checkpoint once, hub names falling back to the prepared copy
(and saying so), and the clear error when there is none. A tiny BERT in a throwaway package stands in for the
real packages here; the slow suite prepares the real ones."""

from __future__ import annotations

import logging
import sys

import pytest
import transformers

from lightning_vlm import pretrained
from lightning_vlm.encoders import TextEncoder

NAME = "someone/tiny-bert"


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """A package `tiny_bert_pkg` holding a model folder, registered as the packaged copy of NAME."""
    package = tmp_path / "site" / "tiny_bert_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    transformers.BertModel(config).save_pretrained(package / "model")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxy"]))
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(package / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(pretrained.PACKAGED, NAME, pretrained.PackagedModel(
        "tiny-bert-pkg", "tiny_bert_pkg", "model", "a tiny BERT for tests"))
    monkeypatch.setenv("LIGHTNING_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield package
    sys.modules.pop("tiny_bert_pkg", None)


def test_prepare_once_then_nothing(packaged):
    said: list[str] = []
    assert pretrained.prepare([NAME], say=said.append) == [NAME]
    assert pretrained.is_prepared(NAME) and "prepared a tiny BERT" in said[-1]
    assert pretrained.prepare([NAME], say=said.append) == []
    assert "already prepared" in said[-1]
    with pytest.raises(ValueError, match="no packaged checkpoint"):
        pretrained.prepare(["nobody/nothing"])


def test_hub_name_loads_the_prepared_copy_offline_and_says_which(packaged, caplog):
    pretrained.prepare([NAME], say=lambda _: None)
    with caplog.at_level(logging.WARNING, logger="lightning_vlm.pretrained"):
        encoder = TextEncoder(NAME, vocab_size=30)
    assert encoder.width == 16 and encoder.tokenizer.name_or_path == str(pretrained.prepared_path(NAME))
    assert "prepared copy" in caplog.text and str(pretrained.prepared_path(NAME)) in caplog.text


def test_missing_copy_is_a_clear_error_naming_the_command(packaged):
    with pytest.raises(OSError, match="weights prepare"):
        TextEncoder(NAME, vocab_size=30)


@pytest.mark.slow
def test_real_packaged_checkpoints_load_offline_by_hub_name(real_checkpoints, monkeypatch):
    """The real thing: both packaged checkpoints prepared (pip-installing what is missing), loaded by their hub
    names with the hub unreachable, and the chat LM still knows what it knew."""
    import torch

    from lightning_vlm.encoders.lm import LanguageModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sorted(real_checkpoints) == sorted(pretrained.PACKAGED)
    assert pretrained.prepare(say=lambda _: None) == []
    assert TextEncoder("sentence-transformers/all-MiniLM-L6-v2").width == 384
    lm = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    answer = lm.tokenizer.decode(lm.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer
