"""Where shards come from: brace patterns, directories, dataset roots with a manifest, weighted mixtures."""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import braceexpand

from lightning_vlm.errors import InvalidSettingError, MissingInputError

MANIFEST = "dataset.json"
MODALITIES = ("pair", "image", "text")


@dataclass
class ShardSource:
    """One stream of shards and its sampling weight in a mixture.

    ``shards`` is a brace pattern (``data/cc/shard-{000000..000099}.tar``), a directory of ``*.tar``,
    a dataset root holding ``dataset.json`` (then ``split`` picks the sub-list), or a list of any of these.
    ``fraction`` keeps the first ceil(fraction x n) of the n shards (data-efficiency studies); shards are
    written in random order, so that is a random subset, and the same one in every run. ``modality`` says what
    its samples hold: "pair" (image and caption), "image" (the caption, if any, is ignored) or "text" (no image
    needed); unimodal sources give whole batches of their kind (FLAVA's unimodal pretraining; language modelling
    on text alone for a generative paradigm). A dataset root whose manifest names its splits' modality (``data
    convert text``, ``data rehearse``) must be read as that modality. ``repeat``: read in endless passes (shards
    reshuffled each pass), so a small source mixed into a single pass over the others (a rehearsal corpus beside the
    image-text data) lasts the whole run; such a source stops being drawn once every source that does not repeat is
    spent.
    """

    shards: str | list[str]
    weight: float = 1.0
    split: str | None = None
    fraction: float = 1.0
    modality: str = "pair"
    repeat: bool = False

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")

    def urls(self) -> list[str]:
        """The expanded, sorted-per-pattern list of shard paths (its first `fraction`)."""
        self._check_modality()
        urls = self._all_urls()
        return urls[: self._kept(len(urls))]

    def num_samples(self) -> int | None:
        """Sample count from the manifest, when the source is a dataset root that has one (scaled by the share
        of shards kept: the benchmark's shards are of equal size)."""
        if not isinstance(self.shards, str):
            return None
        manifest = read_manifest(self.shards)
        if manifest is None or self.split is None:
            return None
        count = manifest.get("counts", {}).get(self.split)
        if count is None or self.fraction == 1.0:
            return count
        total = len(self._all_urls())
        return count * self._kept(total) // total

    def _all_urls(self) -> list[str]:
        patterns = [self.shards] if isinstance(self.shards, str) else list(self.shards)
        urls = [url for pattern in patterns for url in expand_shards(pattern, self.split)]
        if not urls:
            raise MissingInputError(f"no shards found for {self.shards!r} (split {self.split!r}): point data.init_args"
                                    ".root (or train) at a dataset (python -m lightning_vlm data synth / convert)")
        return urls

    def _check_modality(self) -> None:
        """A split whose manifest says what it holds is read as that (text read as pairs would skip every sample)."""
        manifest = read_manifest(self.shards) if isinstance(self.shards, str) else None
        stored = (manifest or {}).get("modality", {}).get(self.split)
        if stored is not None and stored != self.modality:
            raise InvalidSettingError(f"{self.shards} split {self.split!r} holds {stored} samples: give its source "
                                      f"modality: {stored} (it has {self.modality!r})")

    def _kept(self, total: int) -> int:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        return math.ceil(self.fraction * total)


def read_manifest(root: str | Path) -> dict | None:
    """The ``dataset.json`` of a dataset root, or None when the path is not one."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def expand_shards(pattern: str, split: str | None = None) -> list[str]:
    """Expand one shard specification into paths (see :class:`ShardSource`)."""
    path = Path(pattern)
    manifest = read_manifest(path)
    if manifest is not None:
        if split is None:
            raise ValueError(f"{pattern} is a dataset root; name a split among {sorted(manifest['splits'])}")
        if split not in manifest["splits"]:
            raise KeyError(f"split {split!r} not in {pattern}; it has {sorted(manifest['splits'])}")
        return [str(path / shard) for shard in manifest["splits"][split]]
    if path.is_dir():
        subdir = path / split if split and (path / split).is_dir() else path
        return sorted(str(p) for p in subdir.glob("*.tar"))
    return [url for expanded in braceexpand.braceexpand(pattern) for url in sorted(glob.glob(expanded)) or [expanded]]


def as_sources(spec: str | list | ShardSource | list[ShardSource] | None, split: str) -> list[ShardSource]:
    """Normalise what a recipe wrote (a path, a list of paths, or ShardSources) into ShardSources."""
    if spec is None:
        return []
    if isinstance(spec, (str, ShardSource)):
        spec = [spec]
    if all(isinstance(item, str) for item in spec):
        return [ShardSource(list(spec), split=split)]
    sources = [s if isinstance(s, ShardSource) else ShardSource(**s) for s in spec]
    return [s if s.split is not None else replace(s, split=split) for s in sources]
