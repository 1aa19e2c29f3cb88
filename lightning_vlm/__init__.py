"""lightning_vlm: train and compare vision-language models of every paradigm on the same data and trainer."""

__version__ = "0.1.0"
