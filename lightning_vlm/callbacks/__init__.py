"""Lightning callbacks shared by every paradigm."""

from lightning_vlm.callbacks.bad_data import BadDataLogger
from lightning_vlm.callbacks.sample_logger import SampleImageLogger

__all__ = ["BadDataLogger", "SampleImageLogger"]
