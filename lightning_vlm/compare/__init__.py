"""``python -m lightning_vlm compare``: every entry of a comparison trained under one budget and scored by one
yardstick, with a ledger that lets a rerun skip what is done and resume what was interrupted."""

from lightning_vlm.compare.config import Comparison, Entry, load_comparison
from lightning_vlm.compare.run import compare_main, run_comparison

__all__ = ["Comparison", "Entry", "compare_main", "load_comparison", "run_comparison"]
