"""Lightning callbacks shared by every paradigm, and the atomic checkpoint writer."""

from lightning_vlm.callbacks.atomic_checkpoint import AtomicCheckpointIO
from lightning_vlm.callbacks.bad_data import BadDataLogger
from lightning_vlm.callbacks.budget import BudgetMeter
from lightning_vlm.callbacks.predictions import PredictionWriter
from lightning_vlm.callbacks.sample_logger import SampleImageLogger
from lightning_vlm.callbacks.staged_freezing import Phase, StagedFreezing

__all__ = ["AtomicCheckpointIO", "BadDataLogger", "BudgetMeter", "Phase", "PredictionWriter", "SampleImageLogger",
           "StagedFreezing"]
