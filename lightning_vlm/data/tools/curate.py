"""``data curate``: a filtered copy of one split of a shard dataset, and a report of what each rule removed.

Heuristics run first, in this order: image side and aspect ratio, caption characters and words, duplicate captions
(exact or normalised), near-duplicate images (a 64-bit difference hash within a Hamming distance); then CLIPScore from
a trained contrastive model (clipscore.py) drops pairs under a score or all but the best share (bootstrapping, as in
the data-pruning literature). A sample is charged to the first rule that removes it, and a duplicate is judged
against the samples kept so far, so the first of a group stays. Where samples carry ``noisy`` in their json
(``data synth --caption-noise``), the report gives the precision and recall of the noisy pairs removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_vlm.data.reading import BadDataCounter, Consumer, RawSample, consumer_samples, decode
from lightning_vlm.data.sources import MANIFEST, read_manifest
from lightning_vlm.data.tools.clipscore import PairScorer, check_vocabulary, clip_scores
from lightning_vlm.data.tools.convert import MANIFEST_VERSION, write_records
from lightning_vlm.data.tools.inspect import find_shards
from lightning_vlm.errors import InvalidSettingError, MissingInputError

RULES = ("unreadable", "image_side", "aspect_ratio", "caption_chars", "caption_words", "duplicate_caption",
         "near_duplicate_image", "clip_score")  # fmt: skip
DEDUP_MODES = ("exact", "normalized")
ROOT_SPLIT = "train"  # the split name of shards lying in the root itself (img2dataset writes them there)
REPORT_JSON, REPORT_MD = "report.json", "report.md"


@dataclass(frozen=True)
class Rules:
    """What to remove; a bound left None is not applied. Sides in pixels, the aspect ratio as long side / short
    side, ``near_duplicates`` in bits of the 64-bit hash (0: identical hashes), ``min_score`` in CLIPScore units."""

    min_side: int | None = None
    max_side: int | None = None
    max_aspect: float | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None
    dedup_captions: str | None = None
    near_duplicates: int | None = None
    min_score: float | None = None
    keep_fraction: float | None = None

    def check(self, scored: bool) -> None:
        """An `InvalidSettingError` naming the first setting that cannot hold (``scored``: a scorer is given)."""
        for low, high in (("min_side", "max_side"), ("min_chars", "max_chars"), ("min_words", "max_words")):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise InvalidSettingError(f"--{low.replace('_', '-')} {a} exceeds --{high.replace('_', '-')} {b}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise InvalidSettingError(f"--max-aspect-ratio is long side / short side, so at least 1; got "
                                      f"{self.max_aspect}")
        if self.dedup_captions not in (None, *DEDUP_MODES):
            raise InvalidSettingError(f"--dedup-captions is one of {DEDUP_MODES}, got {self.dedup_captions!r}")
        if self.near_duplicates is not None and not 0 <= self.near_duplicates < 64:
            raise InvalidSettingError(f"--near-duplicates is a distance in bits of 64, got {self.near_duplicates}")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise InvalidSettingError(f"--keep-fraction must be in (0, 1], got {self.keep_fraction}")
        if self.min_score is not None and self.keep_fraction is not None:
            raise InvalidSettingError("give --min-score or --keep-fraction, not both")
        if (self.min_score is not None or self.keep_fraction is not None) != scored:
            raise InvalidSettingError("--min-score and --keep-fraction go with a scorer (--scorer-config and "
                                      "--scorer-checkpoint), and a scorer with one of them")

    def settings(self) -> dict[str, Any]:
        """The rules that apply, by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass
class Removal:
    """One removed sample: its key and caption, whether it is noisy (None: not marked), and the kept sample it
    duplicates or its CLIPScore, where known."""

    key: str
    caption: str
    noisy: bool | None = None
    of: str | None = None
    score: float | None = None


@dataclass
class CurationReport:
    """What curation read, kept and removed (per rule, in rule order), and how well it found marked noisy pairs."""

    root: str
    out: str
    split: str
    rules: dict[str, Any]
    read: int = 0
    kept: int = 0
    removed: dict[str, list[Removal]] = field(default_factory=lambda: {rule: [] for rule in RULES})
    marked: bool = False
    noisy: int = 0
    kept_scores: list[float] = field(default_factory=list)

    def noise(self) -> dict[str, Any] | None:
        """Precision (noisy share of the removed) and recall (removed share of the noisy), overall and per rule;
        None when no sample says whether it is noisy. A ratio with nothing to divide by is None."""
        if not self.marked:
            return None
        per_rule = {rule: self._found(rs) for rule, rs in self.removed.items() if rs}
        every = self._found([r for removals in self.removed.values() for r in removals])
        after = _ratio(self.noisy - every["noisy"], self.kept)
        return {"marked_noisy": self.noisy, **every, "noisy_share_after": after, "rules": per_rule}

    def _found(self, removals: list[Removal]) -> dict[str, Any]:
        """How many of ``removals`` were noisy, as a share of them (precision) and of all noisy pairs (recall)."""
        noisy = sum(bool(r.noisy) for r in removals)
        return {"removed": len(removals), "noisy": noisy, "precision": _ratio(noisy, len(removals)),
                "recall": _ratio(noisy, self.noisy)}

    def to_json(self) -> dict[str, Any]:
        """The report as report.json holds it: every removed sample, by rule."""
        counts = {rule: len(rs) for rule, rs in self.removed.items()}
        scores = _summary(self.kept_scores)
        removed = {rule: [{k: v for k, v in asdict(r).items() if v is not None} for r in rs]
                   for rule, rs in self.removed.items() if rs}  # fmt: skip
        return {"root": self.root, "out": self.out, "split": self.split, "rules": self.rules, "read": self.read,
                "kept": self.kept, "removed_counts": counts, "noise": self.noise(), "kept_clip_scores": scores,
                "removed": removed}  # fmt: skip

    def markdown(self, examples: int = 5) -> str:
        """A readable report: the counts per rule, a few removed samples each, and the noise found."""
        lines = [f"# Curation of {self.root} (split {self.split}) into {self.out}", "",
                 f"Read {self.read} samples, kept {self.kept}. Rules: "
                 + (", ".join(f"{k}={v}" for k, v in self.rules.items()) or "none") + ".", "",
                 "| rule | removed |", "| --- | --- |"]  # fmt: skip
        lines += [f"| {rule} | {len(rs)} |" for rule, rs in self.removed.items() if rs]
        if self.kept_scores:
            quartiles = ", ".join(f"{name} {value:.3f}" for name, value in _summary(self.kept_scores).items())
            lines += ["", f"CLIPScore of the kept pairs: {quartiles}."]
        noise = self.noise()
        if noise is not None:
            lines += ["", f"Noisy pairs (marked): {noise['marked_noisy']}; removed {noise['noisy']}: precision "
                      f"{_shown(noise['precision'])}, recall {_shown(noise['recall'])}; noisy share of the kept "
                      f"{_shown(noise['noisy_share_after'])}.", "", "| rule | removed | noisy | precision | recall |",
                      "| --- | --- | --- | --- | --- |"]  # fmt: skip
            lines += [f"| {rule} | {r['removed']} | {r['noisy']} | {_shown(r['precision'])} | {_shown(r['recall'])} |"
                      for rule, r in noise["rules"].items()]  # fmt: skip
        for rule, rs in self.removed.items():
            if rs:
                lines += ["", f"## {rule}: {len(rs)} removed", ""] + [f"- {_example(r)}" for r in rs[:examples]]
        return "\n".join(lines) + "\n"


def curate(root: str | Path, out: str | Path, rules: Rules, split: str = "train", scorer: PairScorer | None = None,
           samples_per_shard: int = 1000, batch_size: int = 256) -> CurationReport:
    """Write ``out``: ``split`` of the dataset at ``root`` filtered by ``rules`` (its samples' bytes unchanged), the
    other splits (and the tokenizer a manifest names) copied as they are, a manifest, and report.json and
    report.md; return the report."""
    rules.check(scorer is not None)
    root, out = Path(root), Path(out)
    manifest, splits = input_splits(root, out, split)
    urls = [str(root / shard) for shard in splits[split]]
    report = CurationReport(str(root), str(out), split, rules.settings())
    keep = _decide(urls, rules, scorer, batch_size, report)
    out.mkdir(parents=True, exist_ok=True)
    shards, report.kept = write_records(_kept_records(urls, keep), out / split, samples_per_shard)
    _write_manifest(root, out, manifest, splits, split, [p.relative_to(out).as_posix() for p in shards], report)
    (out / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    (out / REPORT_MD).write_text(report.markdown())
    return report


def input_splits(root: Path, out: Path, split: str) -> tuple[dict[str, Any] | None, dict[str, list[str]]]:
    """(the manifest or None, split -> shard paths relative to ``root``), from the manifest or else the folders
    (shards in the root itself form the split "train"); a `UsageError` when there is no dataset, ``split`` is not
    in it, its shards are missing, or ``out`` is ``root``."""
    if out.resolve() == root.resolve():
        raise InvalidSettingError(f"--out {out} is the input dataset: curation writes a copy, give another folder")
    manifest = read_manifest(root)
    if manifest is not None:
        splits = manifest.get("splits", {})
    else:
        try:
            groups = find_shards(root) if root.is_dir() else {}
        except FileNotFoundError:
            groups = {}
        splits = {ROOT_SPLIT if name == "." else name: [p.relative_to(root).as_posix() for p in shards]
                  for name, shards in groups.items()}  # fmt: skip
    if not splits:
        raise MissingInputError(f"{root} has no {MANIFEST} and no .tar shards: give --in a dataset root (written by "
                                "data synth, data convert or img2dataset)")
    if split not in splits:
        raise InvalidSettingError(f"split {split!r} is not in {root}; it has {sorted(splits)}")
    if not splits[split]:
        raise MissingInputError(f"{root}: split {split!r} has no shards, so there is nothing to curate")
    missing = [shard for shard in splits[split] if not (root / shard).is_file()]
    if missing:
        raise MissingInputError(f"{root}: split {split!r} lists {len(missing)} missing shard(s) such as {missing[0]}: "
                                "regenerate or reconvert the dataset")
    return manifest, splits


def dhash(image: Image.Image) -> int:
    """64-bit difference hash (Krawetz): a 9x8 greyscale thumbnail, one bit per pair of horizontal neighbours, set
    where the left one is brighter; resizing, recompression and small edits move few bits."""
    pixels = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    return int(np.packbits(pixels[:, :-1] > pixels[:, 1:]).view(">u8")[0])


def normalized(caption: str) -> str:
    """A caption compared up to case, punctuation and spacing."""
    text = unicodedata.normalize("NFKC", caption).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


class HashIndex:
    """The hashes of the images kept so far, searched for one within a Hamming distance; returns its key."""

    def __init__(self) -> None:
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.keys: list[str] = []

    def near(self, value: int, distance: int) -> str | None:
        """The key of the first kept image whose hash differs from ``value`` in at most ``distance`` bits."""
        hits = np.flatnonzero(np.bitwise_count(self.hashes[: len(self.keys)] ^ np.uint64(value)) <= distance)
        return self.keys[hits[0]] if len(hits) else None

    def add(self, value: int, key: str) -> None:
        """Record a kept image's hash under its key."""
        if len(self.keys) == len(self.hashes):  # grow by doubling
            self.hashes = np.concatenate([self.hashes, np.zeros(max(len(self.hashes), 1024), dtype=np.uint64)])
        self.hashes[len(self.keys)] = value
        self.keys.append(key)


@dataclass
class _Heuristics:
    """The heuristic rules with what the duplicate rules have seen among the samples kept so far."""

    rules: Rules
    captions: dict[str, str] = field(default_factory=dict)  # caption as compared -> key of its kept sample
    images: HashIndex = field(default_factory=HashIndex)

    def verdict(self, sample: RawSample) -> tuple[str | None, str | None]:
        """(the first rule that removes the sample, the key of the kept sample it duplicates), or (None, None) after
        recording it as kept."""
        r, (width, height), caption = self.rules, sample.image.size, sample.caption
        if not _within(min(width, height), r.min_side, None) or not _within(max(width, height), None, r.max_side):
            return "image_side", None
        if not _within(max(width, height) / max(min(width, height), 1), None, r.max_aspect):
            return "aspect_ratio", None
        if not _within(len(caption), r.min_chars, r.max_chars):
            return "caption_chars", None
        if not _within(len(caption.split()), r.min_words, r.max_words):
            return "caption_words", None
        text = caption if r.dedup_captions == "exact" else normalized(caption)
        if r.dedup_captions is not None and text in self.captions:
            return "duplicate_caption", self.captions[text]
        hashed = dhash(sample.image) if r.near_duplicates is not None else None
        if hashed is not None and (twin := self.images.near(hashed, r.near_duplicates)) is not None:
            return "near_duplicate_image", twin
        if r.dedup_captions is not None:
            self.captions[text] = sample.key
        if hashed is not None:
            self.images.add(hashed, sample.key)
        return None, None


def _decide(urls: list[str], rules: Rules, scorer: PairScorer | None, batch_size: int,
            report: CurationReport) -> list[bool]:
    """Whether to keep each sample, in reading order; the removed ones recorded in ``report`` by rule."""
    heuristics, keep, counter = _Heuristics(rules), [], BadDataCounter()
    scored: list[tuple[int, Removal, float]] = []
    batch: list[tuple[int, Removal, Image.Image]] = []
    for index, raw in enumerate(consumer_samples(urls, Consumer(), counter)):
        sample = decode(raw, counter)
        info = sample.info if sample is not None else _json(raw)
        noisy = bool(info["noisy"]) if "noisy" in info else None
        removal = Removal(raw["__key__"], sample.caption if sample else "", noisy)
        report.marked |= noisy is not None
        report.noisy += bool(noisy)
        rule, twin = ("unreadable", None) if sample is None else heuristics.verdict(sample)
        keep.append(rule is None)
        if rule is not None:
            removal.of = twin
            report.removed[rule].append(removal)
        elif scorer is not None:
            batch.append((index, removal, sample.image))
            if len(batch) == batch_size:
                scored += _scored(scorer, batch)
                batch = []
    report.read = len(keep)
    if scorer is not None:
        scored += _scored(scorer, batch) if batch else []
        for index, removal, score in _worst(scored, rules):
            keep[index] = False
            removal.score = score
            report.removed["clip_score"].append(removal)
        report.kept_scores = [score for index, _, score in scored if keep[index]]
    return keep


def _scored(scorer: PairScorer, batch: list[tuple[int, Removal, Image.Image]]) -> list[tuple[int, Removal, float]]:
    """The batch's pairs with their CLIPScore, after checking the scorer's tokenizer knows their words."""
    captions = [removal.caption for _, removal, _ in batch]
    check_vocabulary(scorer, captions)
    scores = clip_scores(scorer, [image for _, _, image in batch], captions).tolist()
    return [(index, removal, score) for (index, removal, _), score in zip(batch, scores)]


def _worst(scored: list[tuple[int, Removal, float]], rules: Rules) -> list[tuple[int, Removal, float]]:
    """The pairs CLIPScore removes, worst first: those under ``min_score``, or all but the best ``keep_fraction``
    (round(fraction x n) kept; equal scores keep the earlier sample)."""
    ranked = sorted(scored, key=lambda item: (item[2], -item[0]))
    if rules.min_score is not None:
        return [item for item in ranked if item[2] < rules.min_score]
    return ranked[: len(ranked) - round(rules.keep_fraction * len(ranked))]


def _kept_records(urls: list[str], keep: list[bool]) -> Iterator[dict[str, bytes]]:
    """The kept samples as read (every member's bytes), without webdataset's bookkeeping fields."""
    samples = consumer_samples(urls, Consumer(), BadDataCounter())
    for kept, raw in zip(keep, samples, strict=True):
        if kept:
            yield {k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}


def _write_manifest(root: Path, out: Path, manifest: dict[str, Any] | None, splits: dict[str, list[str]],
                    split: str, shards: list[str], report: CurationReport) -> None:
    """Copy the other splits' shards and the tokenizer the manifest names, and write the manifest of ``out``: the
    input's (or a new one), the curated split's shards and count replaced, the curation recorded."""
    written = dict(manifest or {"version": MANIFEST_VERSION})
    for name, names in splits.items():
        for shard in names if name != split else []:
            (out / shard).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / shard, out / shard)
    if written.get("tokenizer"):
        shutil.copyfile(root / written["tokenizer"], out / written["tokenizer"])
    written["splits"] = {**splits, split: shards}
    written["counts"] = {**written.get("counts", {}), split: report.kept}
    written["curated"] = {"from": str(root), "split": split, "rules": report.rules, "read": report.read,
                          "kept": report.kept, "report": REPORT_JSON}  # fmt: skip
    partial = out / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(written, indent=2) + "\n")
    os.replace(partial, out / MANIFEST)


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _json(raw: dict[str, Any]) -> dict[str, Any]:
    """The json of a sample that could not be decoded, or nothing."""
    try:
        return json.loads(raw["json"])
    except (KeyError, ValueError):
        return {}


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _summary(scores: list[float]) -> dict[str, float] | None:
    """Quartiles of the kept pairs' CLIPScores, None without a scorer."""
    if not scores:
        return None
    q = np.quantile(scores, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
    return dict(zip(("min", "q25", "median", "q75", "max"), q))


def _example(removal: Removal) -> str:
    """One removed sample as a line of report.md."""
    extra = f" (duplicates {removal.of})" if removal.of else f" (CLIPScore {removal.score:.3f})" if (
        removal.score is not None) else ""  # fmt: skip
    return f"`{removal.key}`{' [noisy]' if removal.noisy else ''}: {json.dumps(removal.caption)}{extra}"
