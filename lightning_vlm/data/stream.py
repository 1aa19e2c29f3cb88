"""The per-consumer streaming pipeline: read -> mix sources -> shuffle -> decode -> transform -> format -> batch
(bucketed by image size where images keep their own size).

Batching happens inside the stream (the DataLoader gets ``batch_size=None``) so each worker knows exactly
how many batches it owes: with `samples_per_epoch` set, every rank yields the same number of steps.

Sources of one modality mix sample by sample; sources of different modalities (image-only, text-only, pairs)
mix batch by batch, each batch tagged with its ``modality`` (a generative paradigm trains a text-only batch through
its language model alone). The batch-level draw is seeded by the epoch alone, so every rank and worker draws the
same sequence and the ranks of a step agree on its modality (a contrastive loss gathers across ranks only on pairs).

A stream is a pure function of (seed, epoch, rank, worker), so its position is two numbers, `StreamPosition`: the
epoch and how many of its batches the rank consumed. A resumed run re-derives the epoch and drops the batches
already trained on (read and prepared again: the shuffle and augmentation draws depend on which samples decode, so
replaying is what keeps them exact; it costs what reading them cost). Rebuilding that state rather than snapshotting
it (shuffle buffers of decoded samples, per-worker generators, half-filled task groups) keeps checkpoints small and
no worker state crosses processes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_vlm.data.collate import Collator, Example
from lightning_vlm.data.reading import (
    BadDataCounter,
    Consumer,
    RawSample,
    consumer_samples,
    decode,
    repeated,
    resampled,
)
from lightning_vlm.data.sources import ShardSource
from lightning_vlm.data.tasks import TaskFormatter
from lightning_vlm.data.transforms import ImageTransform
from lightning_vlm.errors import MissingInputError


@dataclass
class StreamConfig:
    """How one split is streamed. `samples_per_epoch` is per rank; None means one pass over the shards.
    `bucket_window`: batches are cut from windows of this many batches' examples sorted by image size (0: off)."""

    batch_size: int = 32
    shuffle_buffer: int = 0
    samples_per_epoch: int | None = None
    resampled: bool = False
    drop_last: bool = False
    seed: int = 0
    group_by_task: bool = False
    bucket_window: int = 0


@dataclass(frozen=True)
class StreamPosition:
    """Where a training stream (re)starts: its epoch, and how many of that epoch's batches the rank consumed."""

    epoch: int = 0
    batch: int = 0


class ShardStream(IterableDataset):
    """An IterableDataset of collated batches for one rank; workers of the rank share its epoch."""

    def __init__(
        self,
        sources: list[ShardSource],
        transform: ImageTransform,
        formatter: TaskFormatter,
        collate: Collator,
        config: StreamConfig,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.urls = [source.urls() for source in sources]
        self.weights = [source.weight for source in sources]
        self.modalities = [source.modality for source in sources]
        self.repeats = [source.repeat for source in sources]
        self.transform, self.formatter, self.collate, self.config = transform, formatter, collate, config
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0  # `start`: batches of this epoch the rank already consumed (resumed runs)

    def __len__(self) -> int:
        """Batches per rank, when the epoch has an explicit size."""
        if self.config.samples_per_epoch is None:
            raise TypeError("this stream has no fixed length: set samples_per_epoch")
        return self.config.samples_per_epoch // self.config.batch_size

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        workers = worker.num_workers if worker else 1
        # The DataLoader takes batches from its workers in turn, from worker 0; a resumed epoch goes on with the
        # worker whose turn was next, so DataLoader worker j plays the part of worker (j + start) % workers.
        role = ((worker.id if worker else 0) + self.start) % workers
        consumer = Consumer(self.rank, self.world_size, role, workers)
        seed = f"{self.config.seed}-{self.epoch}"  # fixed here: the generators below run lazily
        counter = BadDataCounter()
        groups = {m: [i for i, mi in enumerate(self.modalities) if mi == m] for m in dict.fromkeys(self.modalities)}
        pipelines = [self._modality_batches(m, sources, consumer, counter, seed) for m, sources in groups.items()]
        weights = [sum(self.weights[i] for i in sources) for sources in groups.values()]
        endless = [all(self.repeats[i] for i in sources) for sources in groups.values()]
        batches = pipelines[0] if len(pipelines) == 1 else _drawn(pipelines, weights, random.Random(seed), endless)
        if self.config.samples_per_epoch is not None:
            batches = _take(batches, _share(len(self), consumer))
        return itertools.islice(batches, _share(self.start, consumer), None)

    def _modality_batches(self, modality: str, sources: list[int], consumer: Consumer, counter: BadDataCounter,
                          seed: str) -> Iterator[dict]:
        """Batches of the sources of one modality, mixed sample by sample and shuffled."""
        suffix = "" if modality == "pair" else f"-{modality}"  # pairs keep the seed they had before unimodal data
        rng = random.Random(f"{seed}-{consumer.index}{suffix}")
        raw = self._mixed(sources, consumer, counter, rng, seed)
        if self.config.shuffle_buffer > 1:
            raw = _shuffled(raw, self.config.shuffle_buffer, rng)
        examples = (ex for ex in (self._prepare(r, counter, rng, modality) for r in raw) if ex is not None)
        for batch in self._batched(examples, counter, rng):
            batch["modality"] = modality
            yield batch

    def _mixed(self, sources: list[int], consumer: Consumer, counter: BadDataCounter, rng: random.Random,
               seed: str) -> Iterator[dict]:
        """Raw samples of the `sources`, drawn by weight while more than one source still has samples."""
        streams = [self._read(i, consumer, counter, seed) for i in sources]
        return _drawn(streams, [self.weights[i] for i in sources], rng, [self.repeats[i] for i in sources])

    def _read(self, source: int, consumer: Consumer, counter: BadDataCounter, seed: str) -> Iterator[dict]:
        urls = self.urls[source]
        if self.config.resampled:
            return resampled(urls, consumer, counter, seed)
        if self.config.samples_per_epoch is not None or self.repeats[source]:
            return repeated(urls, consumer, counter, seed)
        return consumer_samples(urls, consumer, counter)

    def _prepare(self, raw: dict, counter: BadDataCounter, rng: random.Random, modality: str) -> Example | None:
        sample: RawSample | None = decode(raw, counter, modality)
        if sample is None:
            return None
        pixels, sample, flipped = self.transform(sample, rng)
        if modality == "text":
            pixels = torch.zeros_like(pixels)  # no image: the normalised mean, whatever the model's statistics
        text = self.formatter(sample, self.transform.image_size, rng, modality)
        meta = dict(sample.info, key=sample.key, caption=sample.caption, flipped=flipped, **text.extra)
        return Example(pixels, text, meta)

    def _batched(self, examples: Iterator[Example], counter: BadDataCounter, rng: random.Random) -> Iterator[dict]:
        """Full batches, each held back until the next example is read so trailing skips are still reported.

        With ``group_by_task`` every batch holds examples of one task (filled side by side, in arrival order), so
        a batch of one-line questions is not padded to a caption's length, as LLaVA groups by modality. With
        ``bucket_window`` a group fills a window of that many batches, which `_bucketed` cuts into batches of
        images of similar size; what is left at the end is bucketed alike, so only a last partial batch is dropped.
        """
        window = self.config.batch_size * max(1, self.config.bucket_window)
        filling: dict[str, list[Example]] = {}
        ready: list[list[Example]] = []
        for example in examples:
            for batch in ready:
                yield self.collate(batch, *counter.take())
            ready = []
            group = example.text.task if self.config.group_by_task else ""
            filling.setdefault(group, []).append(example)
            if len(filling[group]) == window:
                ready = self._bucketed(filling.pop(group), rng)
        left = [batch for group in filling.values() for batch in self._bucketed(group, rng)]
        if self.config.drop_last:
            left = [batch for batch in left if len(batch) == self.config.batch_size]
        for last in ready + left:  # a held window leaves no partial batch of its task
            yield self.collate(last, *counter.take())

    def _bucketed(self, examples: list[Example], rng: random.Random) -> list[list[Example]]:
        """The examples as batches: as they came without bucketing; else sorted by image size (height, width),
        cut into batches (the last may be partial), the batches' order shuffled."""
        if not self.config.bucket_window:
            return [examples]
        ordered = sorted(examples, key=lambda example: tuple(example.pixel_values.shape[1:]))
        size = self.config.batch_size
        batches = [ordered[start:start + size] for start in range(0, len(ordered), size)]
        rng.shuffle(batches)
        return batches


class EpochLoader(DataLoader):
    """A DataLoader whose every iteration starts where `position()` says, so each epoch reshuffles and a resumed
    run goes on mid-epoch. Lightning sets the epoch of samplers only, and an IterableDataset has none.

    The position is read when the first batch is asked for, not when the iterator is made: Lightning makes it
    before it restores a checkpoint when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``
    (lightning #20550). Without `position`, iterations are counted as epochs. Workers' seeds come from a generator
    of the loader's own, so loading data never moves the model's random stream (dropout, masking). A pass that gives
    no batch at all fails, naming the likely causes.
    """

    def __init__(self, stream: ShardStream, num_workers: int,
                 position: Callable[[], StreamPosition] | None = None) -> None:
        super().__init__(stream, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                         pin_memory=torch.cuda.is_available(), generator=torch.Generator())
        self.position, self.iterations = position, 0

    def __iter__(self) -> Iterator[dict]:
        return self._epoch()

    def state_dict(self) -> dict:
        """Empty: the position is the DataModule's state, which Lightning restores before it makes the iterator
        (its path for loader states misses #20550's case); defined so Lightning knows this loader resumes."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing: see `state_dict`."""

    def _epoch(self) -> Iterator[dict]:
        position = self.position() if self.position is not None else StreamPosition(self.iterations)
        self.iterations += 1
        self.dataset.epoch, self.dataset.start = position.epoch, position.batch
        batches = 0
        for batches, batch in enumerate(super().__iter__(), 1):  # noqa: B007 - counted
            yield batch
        if batches == 0 and position.batch == 0:  # a trainer would otherwise run empty epochs forever
            raise MissingInputError("a pass over the data gave no batch: its shards are missing or unreadable, or "
                                    "hold fewer samples than one batch; check them with python -m lightning_vlm "
                                    "data inspect")


def make_loader(stream: ShardStream, num_workers: int, position: Callable[[], StreamPosition] | None = None,
                train: bool = True) -> DataLoader:
    """A loader over pre-batched streams (no sampler, no re-batching); training streams reshuffle per epoch."""
    if train:
        return EpochLoader(stream, num_workers, position)
    return DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator())


def _as_is(batch: dict) -> dict:
    """Batches arrive collated; the default per-batch conversion would walk every metadata dict."""
    return batch


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A reservoir shuffle buffer: fill to `size`, then emit a random resident for each new arrival."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _drawn(streams: list[Iterator[dict]], weights: list[float], rng: random.Random,
           endless: list[bool] | None = None) -> Iterator[dict]:
    """Items (samples or batches) drawn from `streams` by weight while more than one still has items; streams
    marked `endless` (repeated sources) are drawn until the others are spent, or forever if all are endless."""
    streams, weights = list(streams), list(weights)
    endless = list(endless or [False] * len(streams))
    bounded = not all(endless)
    while streams and not (bounded and all(endless)):
        i = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
        item = next(streams[i], None)
        if item is None:
            del streams[i], weights[i], endless[i]
        else:
            yield item


def _share(total: int, consumer: Consumer) -> int:
    """This worker's part of its rank's `total` batches (the first workers take the remainder)."""
    per_rank_workers = consumer.num_workers
    return total // per_rank_workers + (consumer.worker < total % per_rank_workers)


def _take(items: Iterator, n: int) -> Iterator:
    for _, item in zip(range(n), items):
        yield item
