"""The command line: LightningCLI for fit/validate/test/predict, plus the ``data`` tools.

``python -m lightning_vlm fit --config recipes/clip.yaml`` (several ``--config`` compose, later ones win;
``--print_config`` shows the resolved configuration; an unknown key fails naming the key).
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_vlm.callbacks import BadDataLogger, SampleImageLogger
from lightning_vlm.data.datamodule import ensure_default_benchmark

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
    "callbacks": [LearningRateMonitor(), RichProgressBar(), SampleImageLogger(), BadDataLogger()],
}


class VLMCLI(LightningCLI):
    """LightningCLI with our default logger and callbacks, and the default data generated on demand."""

    def before_instantiate_classes(self) -> None:
        """Make the default synthetic benchmark before the model reads its tokenizer, if a recipe needs it."""
        config = self.config.get(self.config.subcommand) if self.subcommand else self.config
        root = (config.get("data") or {}).get("init_args", {}).get("root")
        if root is not None:
            ensure_default_benchmark(root)


def run_cli(args: list[str] | None = None) -> VLMCLI:
    """Parse `args` (default: the process arguments) and run the chosen Trainer subcommand."""
    return VLMCLI(
        trainer_defaults=TRAINER_DEFAULTS,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightning_vlm``: ``data ...`` goes to the data tools, the rest to LightningCLI."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        from lightning_vlm.data.data_cli import main as data_main

        return data_main(argv[1:])
    run_cli(argv)
    return 0
