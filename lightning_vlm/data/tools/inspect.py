"""Summarise webdataset shards by reading the tars themselves, so it works with or without a manifest."""

from __future__ import annotations

import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from braceexpand import braceexpand
from PIL import Image

from lightning_vlm.data.sources import MANIFEST, read_manifest

IMAGE_KEYS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"}
SHOWN_SIZES = 5
SHOWN_CHARS = 160


@dataclass
class SplitStats:
    """What one group of shards holds."""

    shards: int = 0
    samples: int = 0
    keys: Counter = field(default_factory=Counter)  # extension -> number of samples carrying it
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> number of images
    unreadable: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


def inspect_shards(path: Path | str, samples: int = 3) -> str:
    """A printable report of shards: per split the shard and sample counts, keys, image sizes and a few samples.

    ``path`` is a dataset root (shards in split subfolders and/or directly inside), one tar, or a brace pattern.
    """
    groups = find_shards(path)
    manifest = _manifest(Path(path))
    lines = [f"dataset: {path}" + (f" (manifest {MANIFEST} version {manifest.get('version')})" if manifest else "")]
    for split, shards in groups.items():
        stats = SplitStats(shards=len(shards))
        for shard in shards:
            _read_shard(shard, stats, samples)
        lines += _format_split(split, stats, manifest.get("counts", {}).get(split))
    return "\n".join(lines)


def find_shards(path: Path | str) -> dict[str, list[Path]]:
    """Group shard paths by split: subfolder names under a root (``.`` for tars in the root itself),
    or the argument itself for a single tar or a brace pattern."""
    text = str(path)
    if "{" in text:
        return {text: [Path(p) for p in braceexpand(text)]}
    root = Path(path)
    if root.is_file():
        return {root.name: [root]}
    if not root.is_dir():
        raise FileNotFoundError(f"no such shard, pattern or folder: {path}")
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    groups = {f.relative_to(root).as_posix(): sorted(f.glob("*.tar")) for f in folders}
    groups = {split: shards for split, shards in groups.items() if shards}
    if not groups:
        raise FileNotFoundError(f"no .tar shards in {root} or its subfolders")
    return groups


def _manifest(path: Path) -> dict[str, Any]:
    """The dataset manifest of a root folder, or an empty dict when there is none."""
    return read_manifest(path) or {}


def _read_shard(shard: Path, stats: SplitStats, keep: int) -> None:
    """Add one tar's samples to ``stats``, grouping members into samples as webdataset does."""
    current_key, current = None, {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_member(member.name)
            if key != current_key and current_key is not None:
                _add_sample(stats, current_key, current, keep)
                current = {}
            current_key = key
            current[ext] = _read_value(tar.extractfile(member), ext, stats)
    if current_key is not None:
        _add_sample(stats, current_key, current, keep)


def _split_member(name: str) -> tuple[str, str]:
    """Split a member name into (sample key, extension) at the first dot of its base name, like webdataset."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _read_value(stream: IO[bytes], ext: str, stats: SplitStats) -> Any:
    """Decode what the report shows: text and json in full, images only as far as their size (header)."""
    if ext.lower() in IMAGE_KEYS:
        try:
            with Image.open(stream) as image:
                stats.sizes[image.size] += 1
        except Exception:  # any PIL failure means the image is unreadable; counted, not fatal
            stats.unreadable += 1
        return None
    if ext in ("txt", "json"):
        return stream.read().decode("utf-8", errors="replace")
    return None


def _add_sample(stats: SplitStats, key: str, values: dict[str, Any], keep: int) -> None:
    """Count one sample and keep it as an example while fewer than ``keep`` are kept."""
    stats.samples += 1
    stats.keys.update(values.keys())
    if len(stats.examples) < keep:
        stats.examples.append({"key": key, "txt": values.get("txt"), "json": values.get("json")})


def _format_split(split: str, stats: SplitStats, expected: int | None) -> list[str]:
    """Report lines for one split; a manifest count that disagrees with the tars is flagged."""
    check = "" if expected is None else (" (manifest agrees)" if expected == stats.samples
                                         else f" (MANIFEST SAYS {expected})")
    keys = ", ".join(f"{k} {n}" for k, n in sorted(stats.keys.items()))
    sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in stats.sizes.most_common(SHOWN_SIZES))
    more = len(stats.sizes) - SHOWN_SIZES
    lines = [
        f"split {split}: {stats.shards} shards, {stats.samples} samples{check}",
        f"  keys: {keys}",
        f"  image sizes: {sizes or 'none'}" + (f" and {more} more" if more > 0 else ""),
    ]
    if stats.unreadable:
        lines.append(f"  unreadable images: {stats.unreadable}")
    lines += [f"  sample {e['key']}: txt={_abbreviate(e['txt'])} json={_abbreviate(e['json'])}" for e in stats.examples]
    return lines


def _abbreviate(text: str | None) -> str:
    """A one-line, length-limited rendering of a text value."""
    if text is None:
        return "-"
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= SHOWN_CHARS else flat[: SHOWN_CHARS - 3] + "...")
