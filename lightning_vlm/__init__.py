"""lightning_vlm: train and compare vision-language models of every paradigm on the same data and trainer.

``lightning_vlm.load_pretrained(DIR)`` loads a folder written by ``python -m lightning_vlm export`` (export.py),
imported on first use so that importing the package stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":
        from lightning_vlm.export import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lightning_vlm' has no attribute {name!r}")
