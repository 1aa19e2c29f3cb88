"""Convert real image-caption data (a folder + CSV/JSONL, or COCO captions) into webdataset shards.

Shards land in ``out/<split>/shard-%06d.tar`` with img2dataset's keys (``__key__``, ``jpg``/``png``/``webp``,
``txt``, ``json``), and ``out/dataset.json`` records the split, so converted data and the synthetic benchmark
share one layout. Images that are missing or that PIL cannot decode are skipped and listed, never fatal.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from lightning_vlm.data.sources import MANIFEST, read_manifest

MANIFEST_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_COLUMNS = ("image", "file_name")
CAPTION_COLUMNS = ("caption", "text")
FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Sample:
    """One sample to write: an image path relative to the images folder, its caption and its ``json`` record."""

    image: str
    caption: str
    meta: dict[str, Any]


@dataclass
class SkippedImage:
    """An image left out of the shards, and why (missing, not decodable, unsupported format, no caption)."""

    path: str
    reason: str


@dataclass
class ConvertReport:
    """What a conversion wrote and what it had to leave out."""

    out: Path
    split: str
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    skipped_samples: int = 0

    def summary(self) -> str:
        """A few printable lines: counts, where the shards are, and each skipped image with its reason."""
        lines = [
            f"wrote {self.samples} samples in {len(self.shards)} shards to {self.out} (split {self.split!r})",
            f"skipped {len(self.skipped)} images ({self.skipped_samples} samples)",
        ]
        lines += [f"  {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def convert_image_folder(
    images: Path,
    captions: Path,
    out: Path,
    samples_per_shard: int = 1000,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
) -> ConvertReport:
    """Shard a folder of images captioned by a CSV or JSONL file (chosen by suffix).

    Each row is one sample, img2dataset style: an image listed on several rows (several captions) gives one
    sample per caption, so every caption is trained on. Columns other than image and caption go into ``json``.
    Columns default to the first of ``image``/``file_name`` and ``caption``/``text`` present.
    """
    columns, rows = read_caption_rows(Path(captions))
    image_column = pick_column(image_column, IMAGE_COLUMNS, columns, captions)
    caption_column = pick_column(caption_column, CAPTION_COLUMNS, columns, captions)
    samples = [_folder_sample(row, image_column, caption_column, captions, n) for n, row in enumerate(rows, 1)]
    source = {"format": "image_folder", "images": str(images), "captions": str(captions)}
    return write_shards(samples, Path(images), Path(out), split, samples_per_shard, source)


def convert_coco(
    annotations_json: Path,
    images: Path,
    out: Path,
    samples_per_shard: int = 1000,
    split: str = "train",
) -> ConvertReport:
    """Shard a COCO captions split: one sample per image, ``txt`` its first caption, ``json`` all of them.

    Images without any caption are skipped and reported like missing ones.
    """
    coco = json.loads(Path(annotations_json).read_text(encoding="utf-8"))
    _require_keys(coco, ("images", "annotations"), annotations_json)
    captions: dict[Any, list[str]] = {}
    for ann in coco["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    samples = [_coco_sample(im, captions[im["id"]]) for im in coco["images"] if im["id"] in captions]
    uncaptioned = [SkippedImage(im["file_name"], "no caption") for im in coco["images"] if im["id"] not in captions]
    source = {"format": "coco", "annotations": str(annotations_json), "images": str(images)}
    report = write_shards(samples, Path(images), Path(out), split, samples_per_shard, source)
    report.skipped += uncaptioned
    return report


def read_caption_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read a captions table as (column names, rows); CSV by header, JSONL by the first record's keys."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return (list(rows[0]) if rows else []), rows
    raise ValueError(f"captions file {path} must be .csv or .jsonl, got {suffix!r}")


def pick_column(requested: str | None, candidates: tuple[str, ...], columns: list[str], path: Path) -> str:
    """Return the requested column, or the first candidate present; a clear error names the columns found."""
    wanted = (requested,) if requested else candidates
    for name in wanted:
        if name in columns:
            return name
    looked_for = " or ".join(repr(name) for name in wanted)
    raise ValueError(f"{path}: no column {looked_for}; columns found: {columns}")


def write_shards(
    samples: Iterable[Sample],
    images: Path,
    out: Path,
    split: str,
    samples_per_shard: int,
    source: dict[str, str],
) -> ConvertReport:
    """Write the samples whose image is usable to ``out/split/shard-*.tar``, replacing that split's old shards,
    and record the split in the manifest."""
    report = ConvertReport(out=out, split=split)
    records = (_record(n, *usable) for n, usable in enumerate(_readable(samples, images, report)))
    written, report.samples = write_records(records, out / split, samples_per_shard)
    report.shards = [path.relative_to(out).as_posix() for path in written]
    update_manifest(out, split, report.samples, report.shards, source)
    return report


def write_records(records: Iterable[dict[str, Any]], split_dir: Path, samples_per_shard: int) -> tuple[list[Path], int]:
    """Write webdataset records to ``split_dir/shard-*.tar``, replacing the shards there; return the shards written
    and the number of records."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob("shard-*.tar"):
        old.unlink()
    written: list[str] = []
    count = 0
    with wds.ShardWriter(str(split_dir / SHARD_PATTERN), maxcount=samples_per_shard, verbose=0,
                         post=written.append) as sink:
        for count, record in enumerate(records, 1):  # noqa: B007 - counted
            sink.write(record)
    if count == 0:  # ShardWriter opens its first shard eagerly; an empty tar is not a shard
        Path(written.pop()).unlink()
    return [Path(name) for name in written], count


def update_manifest(out: Path, split: str, count: int, shards: list[str], source: dict[str, Any],
                    modality: str | None = None) -> None:
    """Set one split in ``out/dataset.json`` (created if absent; other splits kept), written atomically; a
    unimodal split records its ``modality`` (image-caption splits record none, as before)."""
    path = out / MANIFEST
    manifest = read_manifest(out) or {}
    manifest["version"] = MANIFEST_VERSION
    for name, value in (("counts", count), ("splits", shards), ("source", source)):
        manifest.setdefault(name, {})[split] = value
    if modality is not None:
        manifest.setdefault("modality", {})[split] = modality
    else:
        manifest.get("modality", {}).pop(split, None)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class UnusableImage(Exception):
    """An image that cannot go into a shard; the message says why."""


def _readable(samples: Iterable[Sample], images: Path, report: ConvertReport) -> Iterator[tuple[Sample, str, bytes]]:
    """Yield (sample, image key, image bytes) for usable images; record the others in ``report``.

    Each image is checked once, however many captions (samples) it has.
    """
    checked: dict[str, str | None] = {}  # image path -> its shard key, or None once reported as skipped
    for sample in samples:
        if sample.image not in checked:
            try:
                checked[sample.image] = image_key(images / sample.image)
            except UnusableImage as why:
                checked[sample.image] = None
                report.skipped.append(SkippedImage(sample.image, str(why)))
        key = checked[sample.image]
        if key is None:
            report.skipped_samples += 1
            continue
        yield sample, key, (images / sample.image).read_bytes()


def image_key(path: Path) -> str:
    """Return the shard key of the image's real format (``jpg``, ``png``, ``webp``) after fully decoding it."""
    try:
        with Image.open(path) as image:
            image.load()
            fmt = image.format
    except FileNotFoundError:
        raise UnusableImage("missing") from None
    except Exception as error:  # PIL raises many types for bad files; any of them means "not decodable"
        raise UnusableImage(f"not decodable: {error}") from error
    if fmt not in FORMAT_KEYS:
        raise UnusableImage(f"unsupported format {fmt} (expected JPEG, PNG or WEBP)")
    return FORMAT_KEYS[fmt]


def _record(index: int, sample: Sample, image_key: str, image: bytes) -> dict[str, Any]:
    """A webdataset sample with a sequential, dot-free key (file names may contain dots or repeat)."""
    return {
        "__key__": f"{index:09d}",
        image_key: image,
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(sample.meta, ensure_ascii=False).encode("utf-8"),
    }


def _folder_sample(row: dict[str, Any], image_column: str, caption_column: str, path: Path, line: int) -> Sample:
    """A sample from one captions row; the row's other columns are kept in ``json``."""
    _require_keys(row, (image_column, caption_column), f"{path} row {line}")
    image, caption = str(row[image_column]), str(row[caption_column]).strip()
    extra = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
    return Sample(image, caption, {"caption": caption, "source": image, **extra})


def _coco_sample(image: dict[str, Any], captions: list[str]) -> Sample:
    """A sample from a COCO image entry and all of its captions."""
    meta = {"caption": captions[0], "captions": captions, "image_id": image["id"], "file_name": image["file_name"]}
    return Sample(image["file_name"], captions[0], meta)


def _require_keys(record: dict[str, Any], keys: tuple[str, ...], where: object) -> None:
    """Raise a ValueError naming the missing keys and the keys present."""
    missing = [k for k in keys if record.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing {missing}; keys found: {sorted(record)}")
