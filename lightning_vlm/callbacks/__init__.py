"""Lightning callbacks shared by every paradigm."""

from lightning_vlm.callbacks.bad_data import BadDataLogger
from lightning_vlm.callbacks.sample_logger import SampleImageLogger
from lightning_vlm.callbacks.staged_freezing import Phase, StagedFreezing

__all__ = ["BadDataLogger", "Phase", "SampleImageLogger", "StagedFreezing"]
