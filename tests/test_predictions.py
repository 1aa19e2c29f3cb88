"""`PredictionWriter` keeps what ``predict`` returns: embeddings as safetensors with their keys (through the CLI),
generated answers as JSONL rows, and per-rank parts merged in rank order."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_vlm.callbacks.predictions import merge, read_keys, write
from lightning_vlm.cli import main

from conftest import tokenizer_overrides

RECIPES = Path(__file__).parents[1] / "recipes"


def test_predict_writes_contrastive_embeddings_with_their_keys(tiny_benchmark, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES / "clip.yaml"
    out = tmp_path / "embeddings.safetensors"
    main(
        [
            "predict",
            "--config",
            str(recipe),
            "--data.init_args.root",
            tiny_benchmark,
            *tokenizer_overrides(tiny_benchmark, recipe),
            "--model.init_args.init_from",
            "[]",
            "--data.init_args.eval_batch_size",
            "16",
            "--data.init_args.num_workers",
            "0",
            "--trainer.limit_predict_batches",
            "2",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks+=lightning_vlm.callbacks.PredictionWriter",
            f"--trainer.callbacks.path={out}",
        ]
    )
    tensors, keys = load_file(out), read_keys(out)
    assert tensors["image"].shape == tensors["text"].shape == (32, 128) and len(set(keys)) == 32
    assert torch.allclose(tensors["image"].norm(dim=-1), torch.ones(32), atol=1e-2)  # normalised, under bf16


def test_answers_go_to_jsonl_rows_and_rank_parts_merge_in_order(tmp_path):
    batches = [
        {"key": ["a", "b"], "prompt": ["caption:", "what colour?"], "answer": ["a red circle", "red"]},
        {"key": ["c"], "prompt": ["how many?"], "answer": ["two"]},
    ]
    assert not write(batches[:1], tmp_path / "p.rank0") and not write(batches[1:], tmp_path / "p.rank1")
    merge([tmp_path / "p.rank0", tmp_path / "p.rank1"], tmp_path / "answers.jsonl", as_tensors=False)
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert rows == [
        {"key": "a", "prompt": "caption:", "answer": "a red circle"},
        {"key": "b", "prompt": "what colour?", "answer": "red"},
        {"key": "c", "prompt": "how many?", "answer": "two"},
    ]

    embeddings = [{"key": ["a", "b"], "image": torch.randn(2, 4)}, {"key": ["c"], "image": torch.randn(1, 4)}]
    assert write(embeddings[:1], tmp_path / "e.rank0") and write(embeddings[1:], tmp_path / "e.rank1")
    merge([tmp_path / "e.rank0", tmp_path / "e.rank1"], tmp_path / "e.safetensors", as_tensors=True)
    assert read_keys(tmp_path / "e.safetensors") == ["a", "b", "c"]
    assert torch.equal(load_file(tmp_path / "e.safetensors")["image"], torch.cat([e["image"] for e in embeddings]))
