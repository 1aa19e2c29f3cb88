"""Initialise a model from a checkpoint by key prefix, saying exactly what was and was not loaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_vlm.errors import MissingInputError

log = logging.getLogger(__name__)


@dataclass
class WeightsSource:
    """Entries of the checkpoint at ``path`` whose key starts with ``prefix`` (stripped) load into the part
    ``into`` (a dotted path, "" for the whole module). A Lightning checkpoint's ``state_dict`` is read, a
    plain state dict as is. ``made_by`` names the recipe whose run writes the checkpoint: the command line trains
    it first when the checkpoint is missing (`lightning_vlm.cli.ensure_prerequisites`)."""

    path: str
    prefix: str = ""
    into: str = ""
    made_by: str | None = None


@dataclass
class LoadReport:
    """What ``load_weights`` did: keys loaded, keys of the part left as they were, checkpoint keys unused."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]


def load_weights(module: nn.Module, source: WeightsSource) -> LoadReport:
    """Load ``source`` into ``module`` non-strictly and log the report (missing and unexpected keys by name)."""
    path = Path(source.path)
    if not path.is_file():
        made = f"python -m lightning_vlm fit --config {source.made_by}" if source.made_by else "the run that writes it"
        raise MissingInputError(f"init_from: no checkpoint at {path}; train it first ({made}), or start from scratch "
                                "with --model.init_args.init_from '[]'")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    selected = {key[len(source.prefix):]: value for key, value in state.items() if key.startswith(source.prefix)}
    if not selected:
        raise ValueError(f"init_from: no key of {path} starts with {source.prefix!r}")
    target = module.get_submodule(source.into) if source.into else module
    missing, unexpected = target.load_state_dict(selected, strict=False)
    report = LoadReport(sorted(set(selected) - set(unexpected)), sorted(missing), sorted(unexpected))
    log.warning("init_from %s [%s -> %s]: loaded %d tensors; missing %d: %s; unexpected %d: %s", path,
                source.prefix or "*", source.into or "*", len(report.loaded), len(report.missing),
                report.missing, len(report.unexpected), report.unexpected)
    return report
