"""Reading raw samples out of tar shards, split between data-loading consumers, with bad data counted.

webdataset does the tar streaming and grouping of members into samples; the split between
(rank, worker) consumers is written here because it must work for eval sets smaller than the number of
consumers (one val shard, 2 ranks x 2 workers) and must read rank and world size explicitly.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from lightning_vlm.errors import MissingInputError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class BadDataCounter:
    """Counts what this consumer dropped since the last `take`: bad samples and tar read errors."""

    skipped: int = 0
    read_errors: int = 0

    def take(self) -> tuple[int, int]:
        counts = (self.skipped, self.read_errors)
        self.skipped = self.read_errors = 0
        return counts

    def read_error(self, exn: Exception) -> bool:
        """webdataset exception handler: warn once, count, and go on with the next member or shard."""
        self.read_errors += 1
        log.warning("skipping unreadable shard data: %s", exn.args[0] if exn.args else exn)
        return True


@dataclass(frozen=True)
class Consumer:
    """One data-loading process: a worker of a rank. Shards (or samples) are dealt out by `index`."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


@dataclass
class RawSample:
    """A decoded sample as stored: image, caption and the json metadata (empty for plain caption data)."""

    key: str
    image: Image.Image
    caption: str
    info: dict = field(default_factory=dict)


def consumer_samples(urls: list[str], consumer: Consumer, counter: BadDataCounter) -> Iterator[dict]:
    """Raw samples of `urls` that belong to `consumer`.

    With at least as many shards as consumers each consumer reads whole shards; otherwise every consumer
    reads every shard and keeps every `count`-th sample, so small eval sets still split disjointly.
    """
    by_shard = len(urls) >= consumer.count
    mine = urls[consumer.index :: consumer.count] if by_shard else urls
    samples = _tar_samples(mine, counter)
    if by_shard:
        yield from samples
        return
    for i, sample in enumerate(samples):
        if i % consumer.count == consumer.index:
            yield sample


def _tar_samples(urls: list[str], counter: BadDataCounter) -> Iterator[dict]:
    streams = url_opener(({"url": url} for url in urls), handler=counter.read_error)
    files = tar_file_expander(streams, handler=counter.read_error)
    return group_by_keys(files, handler=counter.read_error)


def repeated(urls: list[str], consumer: Consumer, counter: BadDataCounter, seed: int) -> Iterator[dict]:
    """Endless passes over the consumer's samples, shards reshuffled (identically on every consumer) per pass; a
    pass that reads no sample at all (missing or unreadable shards) fails instead of spinning forever."""
    for epoch_pass in range(1 << 62):
        order = list(urls)
        random.Random(f"{seed}-{epoch_pass}").shuffle(order)
        read = 0
        for read, sample in enumerate(consumer_samples(order, consumer, counter), 1):  # noqa: B007 - counted
            yield sample
        if read == 0:
            raise MissingInputError(f"no sample could be read from {len(urls)} shard(s) such as {urls[0]} (reader "
                                    f"{consumer.index} of {consumer.count}): check that they exist and are readable")


def resampled(urls: list[str], consumer: Consumer, counter: BadDataCounter, seed: int) -> Iterator[dict]:
    """Shards drawn with replacement, independently per consumer (webdataset's `resampled=True` semantics)."""
    rng = random.Random(f"{seed}-{consumer.index}")
    while True:
        yield from _tar_samples([rng.choice(urls)], counter)


def decode(raw: dict, counter: BadDataCounter, modality: str = "pair") -> RawSample | None:
    """Decode image, caption and json; a sample missing what its `modality` needs (an image unless "text", a
    caption unless "image") or with a corrupt image is skipped and counted. What a unimodal sample lacks is
    stood in for: an empty caption, or a placeholder image (the stream zeroes its pixels) the model never reads."""
    key = raw.get("__key__", "?")
    try:
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None and modality != "text":
            raise KeyError(f"missing image (has {sorted(raw)})")
        if "txt" not in raw and modality != "image":
            raise KeyError(f"missing txt (has {sorted(raw)})")
        if modality == "text":
            image = Image.new("RGB", (1, 1), (127, 127, 127))
        else:
            with Image.open(io.BytesIO(raw[image_key])) as img:
                image = img.convert("RGB")
        caption = raw["txt"].decode("utf-8").strip() if modality != "image" else ""
        info = json.loads(raw["json"]) if "json" in raw else {}
        return RawSample(key, image, caption, info)
    except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped, never fatal
        counter.skipped += 1
        log.warning("skipping sample %s from %s: %s", key, raw.get("__url__", "?"), exn)
        return None
