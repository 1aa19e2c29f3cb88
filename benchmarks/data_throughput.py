"""Samples/s delivered by ShardDataModule alone (read, decode, transform, format, tokenise, collate), next to a
bare webdataset pipeline that only reads and decodes the same shards (the reference), in the same run; and what a
resume mid-epoch costs: the wait for the first batch after `--resume-at` consumed batches (which the stream reads,
decodes and formats again to replay its random draws) against reading those batches in training.

    python benchmarks/data_throughput.py [--root data/synthetic] [--samples 8192] [--workers 0 2] [--resume-at 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import webdataset as wds

from lightning_vlm.data.datamodule import ShardDataModule, ensure_default_benchmark
from lightning_vlm.data.sources import ShardSource
from lightning_vlm.data.stream import StreamPosition, make_loader


def datamodule(root: str, samples: int, workers: int, batch_size: int) -> ShardDataModule:
    return ShardDataModule(root=root, tasks={"caption": 1, "vqa": 1, "contrastive": 1}, batch_size=batch_size,
                           num_workers=workers, samples_per_epoch=samples, hflip=0.5)


def datamodule_rate(root: str, samples: int, workers: int, batch_size: int) -> float:
    loader = datamodule(root, samples, workers, batch_size).train_dataloader()
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["meta"])
    return seen / (time.perf_counter() - start)


def reference_rate(root: str, samples: int, workers: int, batch_size: int) -> float:
    urls = ShardSource(root, split="train").urls()
    pipeline = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
                .decode("torchrgb").to_tuple("jpg", "txt").batched(batch_size))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def resume_cost(root: str, samples: int, workers: int, batch_size: int, at: int) -> tuple[float, float]:
    """(seconds to the first batch of a stream resumed after `at` batches, seconds to read those `at` batches)."""
    stream = datamodule(root, samples, workers, batch_size).train_dataloader().dataset
    start = time.perf_counter()
    for _, _ in zip(range(at), make_loader(stream, workers, lambda: StreamPosition(0))):
        pass
    read = time.perf_counter() - start
    start = time.perf_counter()
    next(iter(make_loader(stream, workers, lambda: StreamPosition(0, at))))
    return time.perf_counter() - start, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--resume-at", type=int, default=32)
    args = parser.parse_args()
    ensure_default_benchmark(args.root)
    torch.set_num_threads(1)
    for workers in args.workers:
        ours = datamodule_rate(args.root, args.samples, workers, args.batch_size)
        ref = reference_rate(args.root, args.samples, workers, args.batch_size)
        print(f"workers={workers}: ShardDataModule {ours:8.0f} samples/s | webdataset decode-only {ref:8.0f} "
              f"samples/s | ratio {ours / ref:.2f}")
        skip, read = resume_cost(args.root, args.samples, workers, args.batch_size, args.resume_at)
        print(f"workers={workers}: resumed after {args.resume_at} batches, first batch in {skip:.2f} s | reading them "
              f"{read:.2f} s | ratio {skip / read:.2f}")


if __name__ == "__main__":
    main()
