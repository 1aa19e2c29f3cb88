"""Generate the synthetic benchmark: webdataset shards per split, a tokenizer and a manifest (data/sources.py).

Each sample is seeded from (seed, split, index) and tar members carry a fixed mtime, so a seed always gives the
same bytes whatever the number of workers. With ``caption_noise`` a known share of the train captions is made wrong
and every train sample says whether it is (synthetic/noise.py); without it the bytes are those of earlier versions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from webdataset import TarWriter

from lightning_vlm.data.sources import MANIFEST, read_manifest
from lightning_vlm.data.synthetic.language import caption, hard_negatives, questions
from lightning_vlm.data.synthetic.noise import add_caption_noise, check_share, noisy_indices
from lightning_vlm.data.synthetic.render import encode_jpeg, render
from lightning_vlm.data.synthetic.scenes import COLORS, HELD_OUT, SHAPES, SIZES, WORDS, Scene, sample_scene
from lightning_vlm.data.synthetic.style import DEFAULT_STYLE, Style, sample_style
from lightning_vlm.data.synthetic.tokenizer import train_tokenizer
from lightning_vlm.tokens import TOKENIZER_FILE

VERSION = "synthetic-v1"
DEFAULT_ROOT = Path("data/synthetic")
DEFAULT_SIZES: Mapping[str, int] = MappingProxyType(
    {"train": 50000, "val": 1000, "test": 1000, "compositional": 1000, "style_shift": 1000}
)
COMPOSITIONAL = "compositional"  # the split whose every scene holds a held-out colour-shape pair
STYLE_SHIFT = "style_shift"  # the split drawn in styles never used for the others (style.sample_style)
TOKENIZER_SPLIT = "train"
NOISY_SPLIT = "train"  # the split whose captions `caption_noise` corrupts
_STYLED_SCENE_TRIES = 10


@dataclass(frozen=True)
class _Shard:
    root: Path
    split: str
    index: int
    start: int
    stop: int
    seed: int
    image_size: int
    with_text: bool
    split_size: int
    caption_noise: float

    @property
    def name(self) -> str:
        """Path relative to the dataset root, as listed in the manifest."""
        return f"{self.split}/shard-{self.index:06d}.tar"


def generate_benchmark(
    out: str | Path = DEFAULT_ROOT,
    sizes: Mapping[str, int] = DEFAULT_SIZES,
    seed: int = 0,
    image_size: int = 64,
    with_text: bool = True,
    samples_per_shard: int = 1000,
    num_workers: int | None = None,
    caption_noise: float = 0.0,
) -> dict[str, Any]:
    """Write every split's shards, train the tokenizer on the train text, and return the manifest.

    `num_workers` processes write shards in parallel (None: one per CPU; 0 or 1: in this process). `caption_noise`
    is the share of train captions made wrong (synthetic/noise.py); the manifest then records it and their number.
    """
    check_share(caption_noise)
    root, began = Path(out), time.perf_counter()
    shard_names, texts = _write_splits(root, sizes, seed, image_size, with_text, samples_per_shard, num_workers,
                                       caption_noise)
    all_texts = [t for split_texts in texts.values() for t in split_texts]
    train_tokenizer(texts.get(TOKENIZER_SPLIT) or all_texts, root / TOKENIZER_FILE)
    manifest = {
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "with_text": with_text,
        "counts": dict(sizes),
        "splits": shard_names,
        "tokenizer": TOKENIZER_FILE,
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "words": list(WORDS),
        "held_out_combinations": [list(pair) for pair in HELD_OUT],
    }
    if caption_noise and NOISY_SPLIT in sizes:
        noisy = len(noisy_indices(seed, sizes[NOISY_SPLIT], caption_noise))
        manifest["caption_noise"] = {"split": NOISY_SPLIT, "share": caption_noise, "noisy": noisy}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {sum(sizes.values())} samples and {TOKENIZER_FILE} to {root} ({time.perf_counter() - began:.1f}s)")
    return manifest


def missing_splits(root: str | Path, sizes: Mapping[str, int] = DEFAULT_SIZES) -> list[str]:
    """The splits of `sizes` that the benchmark at `root` does not list (all of them where it has no manifest)."""
    manifest = read_manifest(root)
    return [split for split in sizes if manifest is None or split not in manifest["splits"]]


def add_splits(
    root: str | Path,
    sizes: Mapping[str, int] = DEFAULT_SIZES,
    samples_per_shard: int = 1000,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Write the splits of `sizes` that the benchmark at `root` lacks (one generated before they existed), from its
    manifest's seed, image size and text setting, and list them in a manifest replaced atomically; return it.

    The tokenizer and the other splits stay as they are, so runs trained on them remain comparable.
    """
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root} has no {MANIFEST}: generate the benchmark there first")
    missing = {split: sizes[split] for split in missing_splits(root, sizes)}
    if not missing:
        return manifest
    seed, image_size, with_text = manifest["seed"], manifest["image_size"], manifest["with_text"]
    noise = manifest.get("caption_noise", {}).get("share", 0.0)
    shard_names, _ = _write_splits(root, missing, seed, image_size, with_text, samples_per_shard, num_workers, noise)
    manifest["counts"] = manifest["counts"] | missing
    manifest["splits"] = manifest["splits"] | shard_names
    partial = root / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, root / MANIFEST)
    return manifest


def _write_splits(
    root: Path,
    sizes: Mapping[str, int],
    seed: int,
    image_size: int,
    with_text: bool,
    samples_per_shard: int,
    num_workers: int | None,
    caption_noise: float = 0.0,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Write the shards of every split of `sizes` under `root`; return each split's shard names and texts.

    `num_workers` processes write shards in parallel (None: one per CPU; 0 or 1: in this process).
    """
    shards = [
        _Shard(root, split, k, start, min(start + samples_per_shard, n), seed, image_size, with_text, n,
               caption_noise if split == NOISY_SPLIT else 0.0)
        for split, n in sizes.items()
        for k, start in enumerate(range(0, n, samples_per_shard))
    ]
    for split in sizes:
        (root / split).mkdir(parents=True, exist_ok=True)
    texts: dict[str, list[str]] = {split: [] for split in sizes}
    began = time.perf_counter()
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    for shard, shard_texts in _map(_write_shard, shards, workers):
        texts[shard.split] += shard_texts
        if shard.stop == sizes[shard.split]:
            elapsed = time.perf_counter() - began
            print(f"{shard.split}: {shard.stop} samples in {shard.index + 1} shards ({elapsed:.1f}s)", flush=True)
    return {split: [s.name for s in shards if s.split == split] for split in sizes}, texts


def make_sample(seed: int, split: str, index: int, image_size: int = 64, with_text: bool = True) -> dict[str, Any]:
    """One webdataset sample (`__key__`, `jpg`, `txt`, `json` as bytes), a pure function of its arguments."""
    rng, style, scene = _scene(seed, split, index, image_size, with_text)
    text = caption(scene)
    record = {
        "objects": [asdict(obj) for obj in scene.objects],
        "word": scene.word,
        "word_box": scene.word_box,
        "caption": text,
        "qa": questions(scene, rng),
        "hard_negatives": hard_negatives(scene, rng),
        "image_size": [image_size, image_size],
    }
    return {
        "__key__": f"{split}-{index:07d}",
        "jpg": encode_jpeg(render(scene, style)),
        "txt": text.encode(),
        "json": json.dumps(record).encode(),
    }


def _scene(seed: int, split: str, index: int, image_size: int, with_text: bool) -> tuple[random.Random, Style, Scene]:
    """The sample's random stream, style and scene, drawn as `make_sample` draws them (the stream goes on to its
    questions and hard negatives)."""
    rng = random.Random(f"{seed}/{split}/{index}")
    style = sample_style(rng) if split == STYLE_SHIFT else DEFAULT_STYLE
    return rng, style, _sample_scene(rng, image_size, with_text, split, style)


def _sample_scene(rng: random.Random, image_size: int, with_text: bool, split: str, style: Style) -> Scene:
    """The split's scene; a shifted style's larger objects may not fit, so its scene is drawn again (from the same
    rng, so still a pure function of the seed) until they do."""
    draw = lambda: sample_scene(rng, image_size, with_text, compositional=split == COMPOSITIONAL, fractions=style.sizes)
    for _ in range(0 if style == DEFAULT_STYLE else _STYLED_SCENE_TRIES - 1):
        with contextlib.suppress(ValueError):
            return draw()
    return draw()


def _write_shard(shard: _Shard) -> tuple[_Shard, list[str]]:
    """Write one shard; return it with its text (captions, questions, answers, hard negatives) for the tokenizer."""
    texts = []
    with open(shard.root / shard.name, "wb") as stream, TarWriter(stream, encoder=False, mtime=0) as writer:
        for index in range(shard.start, shard.stop):
            sample = make_sample(shard.seed, shard.split, index, shard.image_size, shard.with_text)
            if shard.caption_noise:
                sample = add_caption_noise(sample, shard.seed, index, shard.split_size, shard.caption_noise,
                                           functools.partial(_true_caption, shard))
            writer.write(sample)
            record = json.loads(sample["json"])
            texts.append(record["caption"])
            texts += [s for qa in record["qa"] for s in (qa["question"], qa["answer"])]
            texts += [neg["caption"] for neg in record["hard_negatives"]]
    return shard, texts


def _true_caption(shard: _Shard, index: int) -> str:
    """The caption of sample `index` of the shard's split, from its scene alone (nothing rendered)."""
    return caption(_scene(shard.seed, shard.split, index, shard.image_size, shard.with_text)[2])


def _map(fn: Any, items: list[_Shard], workers: int) -> Iterator[tuple[_Shard, list[str]]]:
    """`fn` over `items` in order, in `workers` processes when more than one is asked for."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"  # fork skips re-importing
    with multiprocessing.get_context(method).Pool(min(workers, len(items))) as pool:
        yield from pool.imap(fn, items)
