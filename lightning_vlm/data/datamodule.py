"""ShardDataModule: streams webdataset shards into the batch dict every paradigm consumes.

Batch fields: ``pixel_values`` (B, 3, H, W) normalised; ``input_ids``, ``attention_mask``, ``labels`` (B, L)
with labels IGNORE_INDEX wherever no loss applies; ``meta`` (list of per-sample dicts: key, task, caption, prompt,
target, objects, qa, hard_negatives, flipped); with ``hard_negatives: k`` training batches of contrastive
examples add ``negative_input_ids`` / ``negative_attention_mask`` / ``negative_valid`` (see `Collator`); a model
with a second text consumer that reads captions (BLIP-2's Q-Former) declares ``caption_tokenizer`` and
batches add ``caption_input_ids`` / ``caption_attention_mask``; with ``keep_aspect`` images keep their own size
and ``pixel_mask`` (B, H, W) marks each one's pixels in the padded ``pixel_values`` (NaN padding: see `Collator`);
``num_skipped`` / ``num_read_errors`` (bad data this batch's
worker dropped since its previous batch, logged by `BadDataLogger`); ``modality``: "pair", or "image" / "text" for
a batch of a unimodal source (`ShardSource(modality=...)`: FLAVA's unimodal terms; for a generative recipe, text
rehearsal, each text labelled on every token, its ``pixel_values`` zeros that the paradigm does not read).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_vlm.data.collate import Collator
from lightning_vlm.data.sources import MANIFEST, ShardSource, as_sources, read_manifest
from lightning_vlm.data.stream import EpochLoader, ShardStream, StreamConfig, StreamPosition, make_loader
from lightning_vlm.data.synthetic import DEFAULT_ROOT, generate_benchmark
from lightning_vlm.data.synthetic.generator import add_splits, missing_splits
from lightning_vlm.data.tasks import TaskFormatter
from lightning_vlm.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, aspect_size
from lightning_vlm.errors import InvalidSettingError
from lightning_vlm.tokens import load_tokenizer, location_tokens


class DataConsumer(Protocol):
    """What the DataModule asks of the model it feeds (every `VLMParadigm` answers it; None where it has none):
    the tokenizer of the text it trains on, a second consumer's for the captions (BLIP-2's Q-Former), the
    placeholder written where each image stands, and its vision backbone's normalisation."""

    tokenizer: PreTrainedTokenizerBase | None
    caption_tokenizer: PreTrainedTokenizerBase | None
    image_token: str | None
    image_mean: tuple[float, ...] | None
    image_std: tuple[float, ...] | None


class ShardDataModule(LightningDataModule):
    """Train/val/test/predict streams over a dataset root (``dataset.json`` + split folders) or explicit shards.

    Args:
        root: dataset root; the default synthetic benchmark is generated here when missing.
        train: shards for training instead of ``root``'s train split: a pattern, a directory, or a list of
            `ShardSource` (``shards``, ``weight``, ``split``, ``modality``, ``repeat``) mixed by weight: sample by
            sample within a modality, batch by batch across modalities (image-only and text-only batches for FLAVA;
            text-only batches a generative paradigm trains its language model on, against forgetting).
        val_splits / test_splits: splits of ``root`` evaluated, in order (each its own dataloader).
        tasks: task mixture for training, e.g. ``{caption: 1, vqa: 1}``; ``eval_tasks`` for evaluation.
        tokenizer: a tokenizer name or path; None takes the model's declared tokenizer, else ``root``'s.
        samples_per_epoch: training samples per rank per epoch (shards repeat); derived from the manifest
            under DDP so every rank runs the same number of steps.
        train_fraction: train on the first share of every training source's shards (a fixed random subset:
            see `ShardSource.fraction`), for data-efficiency studies under one step budget.
        image_mean / image_std: None takes the model's (its vision backbone's) statistics, else CLIP's.
        hard_negatives: hard-negative captions per contrastive training example, drawn from the json's swaps
            (NegCLIP); contrastive losses score them as extra negatives. Evaluation batches carry none.
        object_captions: the probability that a contrastive training example of a scene of several objects is
            captioned by one of its objects alone (`TaskFormatter`); evaluation keeps the scenes' captions.
        caption_prompt / system_prompt: the prompt of captioning examples, and a text put before every
            generative prompt (both outside the labels).
        chat_turns: the most questions of a ``chat`` example; shots: the demonstrations before a ``fewshot``
            example's question (images of the same batch).
        group_by_task: every training batch holds one task (short questions are not padded to captions' length);
            the mixture's weights then hold per batch instead of per sample.
        blind: evaluation images zeroed (the normalised mean), a control for what a model answers from the text
            alone; training batches keep their images.
        keep_aspect: native resolution (Fuyu, Pixtral, LLaVA-NeXT's AnyRes): each image keeps its aspect ratio, its
            longer side resized to ``image_size`` and both sides to multiples of ``size_multiple`` (the model's
            patch size), and a batch is padded to its largest image with a pixel mask. Off: square images.
        bucket_window: with ``keep_aspect``, training batches are cut from windows of this many batches' examples
            sorted by image size, so a batch holds images of similar size and pads little (0: no bucketing).
            Evaluation keeps the split's order (a size-sorted window would bias the first ``eval_max_samples``), and
            its batches are padded to the largest size, a square, so evaluators can stack images across batches.

    Checkpoints keep the training stream's position (`state_dict`), so a run resumed mid-epoch reads exactly the
    batches an uninterrupted run would, in the same order. Resuming mid-epoch with another world size, number of
    workers, batch size, seed, task mixture or shard list is refused, naming what changed; at an epoch boundary any
    of them may change.
    """

    def __init__(
        self,
        root: str = str(DEFAULT_ROOT),
        train: str | list[str] | list[ShardSource] | None = None,
        val_splits: list[str] = ["val"],  # noqa: B006 - jsonargparse needs a literal default
        test_splits: list[str] = ["test", "compositional", "style_shift"],  # noqa: B006
        tasks: dict[str, float] = {"caption": 1.0},  # noqa: B006
        eval_tasks: dict[str, float] | None = None,
        tokenizer: str | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int = 64,
        hflip: float = 0.0,
        crop_scale: tuple[float, float] | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        resampled: bool = False,
        caption_prompt: str = "",
        loc_bins: int = 32,
        hard_negatives: int = 0,
        object_captions: float = 0.0,
        system_prompt: str = "",
        seed: int = 0,
        train_fraction: float = 1.0,
        chat_turns: int = 3,
        shots: int = 2,
        group_by_task: bool = False,
        blind: bool = False,
        keep_aspect: bool = False,
        size_multiple: int = 1,
        bucket_window: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.caption_tokenizer: PreTrainedTokenizerBase | None = None
        self.val_names, self.test_names = list(val_splits), list(test_splits)
        self._train_loader: EpochLoader | None = None
        self._resume: StreamPosition | None = None  # a restored checkpoint's position, taken by the next epoch

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Tensors move; the per-sample ``meta`` dicts (texts, boxes, the scene's json) stay as they are, unwalked:
        Lightning's default recurses into every one of them (16 ms a step for 128 samples on a 2-core CPU)."""
        tensors = {key: value for key, value in batch.items() if key != "meta"}
        return super().transfer_batch_to_device(tensors, device, dataloader_idx) | {"meta": batch["meta"]}

    def prepare_data(self) -> None:
        """Generate the default synthetic benchmark if a recipe points at it and it is missing."""
        ensure_default_benchmark(self.hparams.root)

    def setup(self, stage: str | None = None) -> None:
        splits = (read_manifest(self.hparams.root) or {}).get("splits")
        missing = [name for name in self.val_names + self.test_names if splits is not None and name not in splits]
        if missing:
            raise InvalidSettingError(f"{self.hparams.root} has no split(s) {missing} (it has {sorted(splits)}): "
                                      "set data.init_args.val_splits / test_splits")
        self.tokenizer = self._resolve_tokenizer()
        model = self._model()
        self.caption_tokenizer = model.caption_tokenizer if model is not None else None
        if self._grounding():
            missing = set(location_tokens(self.hparams.loc_bins)) - set(self.tokenizer.get_vocab())
            if missing:
                raise ValueError(f"grounding needs {len(missing)} location tokens the tokenizer lacks: call "
                                 "lightning_vlm.data.datamodule.add_location_tokens on the model's tokenizer")

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(*self._train_stream(), train=True)
        return self._train_loader

    def state_dict(self) -> dict:
        """The training stream's position (the next epoch's start once an epoch is done) and what it depends on."""
        if self.trainer is None or self._train_loader is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        epoch, consumed = self.trainer.current_epoch, progress.current.processed
        if progress.is_last_batch:
            epoch, consumed = epoch + 1, 0
        return {"train_stream": {"epoch": epoch, "batch": consumed, "depends_on": self._stream_identity()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the training stream where the checkpoint left it (refused mid-epoch if the stream changed)."""
        saved = state_dict.get("train_stream")
        if saved is None or self.trainer is None or self.trainer.state.fn != "fit":
            return
        position = StreamPosition(saved["epoch"], saved["batch"])
        if position.batch:
            now = self._stream_identity()
            changed = [f"{key} {saved['depends_on'].get(key)!r} -> {now[key]!r}" for key in now
                       if saved["depends_on"].get(key) != now[key]]
            if changed:
                raise InvalidSettingError(
                    f"cannot resume mid-epoch (epoch {position.epoch}, batch {position.batch}): the training stream "
                    f"changed ({'; '.join(changed)}); resume with the same settings or from a checkpoint written at "
                    "the end of an epoch")
            if self._train_loader is not None and self._train_loader.iterations:
                raise RuntimeError("the training stream started before the checkpoint was restored (a strategy that "
                                   "restores after setup, with a stream of unknown length): set data.init_args."
                                   "samples_per_epoch to resume mid-epoch")
        self._resume = position

    def _next_position(self) -> StreamPosition:
        """Where the next training epoch starts: a restored checkpoint's position once, else the trainer's epoch."""
        position, self._resume = self._resume, None
        return position or StreamPosition(self.trainer.current_epoch)

    def train_sources(self) -> list[ShardSource]:
        """What training reads: the ``train`` sources, or ``root``'s train split (each cut to ``train_fraction``)."""
        sources = as_sources(self.hparams.train, "train") or [ShardSource(self.hparams.root, split="train")]
        return [replace(s, fraction=s.fraction * self.hparams.train_fraction) for s in sources]

    def _train_stream(self) -> tuple[list[ShardSource], dict, StreamConfig]:
        sources = self.train_sources()
        config = StreamConfig(
            batch_size=self.hparams.batch_size,
            shuffle_buffer=self.hparams.shuffle_buffer,
            samples_per_epoch=self._samples_per_epoch(sources),
            resampled=self.hparams.resampled,
            drop_last=True,
            seed=self.hparams.seed,
            group_by_task=self.hparams.group_by_task,
            bucket_window=self.hparams.bucket_window if self.hparams.keep_aspect else 0,
        )
        return sources, self.hparams.tasks, config

    def _stream_identity(self) -> dict:
        """What decides which samples a rank's training stream yields, in which order: a mid-epoch position holds
        only while all of it is unchanged. Shards are compared by file name, so moved data still resumes."""
        sources, tasks, config = self._train_stream()
        shards = [[Path(url).name for url in source.urls()] for source in sources]
        mixture = [[source.weight, source.modality, *(["repeat"] if source.repeat else [])] for source in sources]
        identity = {
            "world_size": self.trainer.world_size if self.trainer else 1,
            "num_workers": self.hparams.num_workers,
            "batch_size": config.batch_size,
            "samples_per_epoch": config.samples_per_epoch,
            "seed": config.seed,
            "shuffle_buffer": config.shuffle_buffer,
            "resampled": config.resampled,
            "group_by_task": config.group_by_task,
            "tasks": dict(tasks),
            "mixture": mixture,
            "shards": f"{sum(map(len, shards))} shards, sha1 {hashlib.sha1(repr(shards).encode()).hexdigest()[:12]}",
        }
        if config.bucket_window:  # named only when on, so checkpoints written before bucketing existed still resume
            identity["bucket_window"] = config.bucket_window
        return identity

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(split) for split in self.val_names]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(split) for split in self.test_names]

    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_names[0])

    def eval_loader(self, split: str) -> DataLoader:
        """One deterministic pass over a split of ``root`` (no shuffle, no flip, every sample once)."""
        batch_size = self.hparams.eval_batch_size or self.hparams.batch_size
        config = StreamConfig(batch_size=batch_size, seed=self.hparams.seed)
        tasks = self.hparams.eval_tasks or self.hparams.tasks
        return self._loader([ShardSource(self.hparams.root, split=split)], tasks, config, train=False)

    def _loader(self, sources: list[ShardSource], tasks: dict, config: StreamConfig, train: bool) -> DataLoader:
        if self.tokenizer is None:
            self.setup()
        mean, std = self._image_stats()
        transform = ImageTransform(
            self.hparams.image_size,
            mean,
            std,
            hflip=self.hparams.hflip if train else 0.0,
            crop_scale=self.hparams.crop_scale if train else None,
            blind=self.hparams.blind and not train,
            keep_aspect=self.hparams.keep_aspect,
            size_multiple=self.hparams.size_multiple,
        )
        negatives = self.hparams.hard_negatives if train else 0  # eval losses stay comparable across recipes
        object_captions = self.hparams.object_captions if train else 0.0  # evaluation scores the scenes' captions
        formatter = TaskFormatter(tasks, self.hparams.caption_prompt, loc_bins=self.hparams.loc_bins,
                                  hard_negatives=negatives, object_captions=object_captions,
                                  system_prompt=self.hparams.system_prompt, chat_turns=self.hparams.chat_turns)
        model = self._model()
        side = max(aspect_size(1, 1, self.hparams.image_size, self.hparams.size_multiple))
        collate = Collator(self.tokenizer, self.hparams.max_length, self.caption_tokenizer,
                           model.image_token if model is not None else None, self.hparams.shots,
                           pad_images=self.hparams.keep_aspect, pad_to=None if train else (side, side))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        stream = ShardStream(sources, transform, formatter, collate, config, rank, world)
        position = self._next_position if train and self.trainer is not None else None
        return make_loader(stream, self.hparams.num_workers, position, train)

    def _samples_per_epoch(self, sources: list[ShardSource]) -> int | None:
        """The explicit epoch size per rank; under DDP derived from the manifest so ranks stay in step."""
        world = self.trainer.world_size if self.trainer else 1
        if self.hparams.samples_per_epoch is not None or self.hparams.resampled or world > 1:
            return self.hparams.samples_per_epoch or _require_count(sources) // world
        return None

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.hparams.tokenizer:
            return load_tokenizer(self.hparams.tokenizer)
        model = self._model()
        declared = model.tokenizer if model is not None else None
        if isinstance(declared, PreTrainedTokenizerBase):
            return declared
        tokenizer = load_tokenizer(self.hparams.root)
        if self._grounding():
            add_location_tokens(tokenizer, self.hparams.loc_bins)
        return tokenizer

    def _grounding(self) -> bool:
        return bool(self.hparams.tasks.get("grounding") or (self.hparams.eval_tasks or {}).get("grounding"))

    def _image_stats(self) -> tuple[tuple, tuple]:
        model = self._model()
        if model is None and (self.hparams.image_mean is None or self.hparams.image_std is None):
            rank_zero_warn("no model attached and no image_mean/image_std given: images are normalised with CLIP's "
                           "statistics; a model expecting others (e.g. a timm ViT's 0.5) would see shifted pixels: "
                           "pass image_mean=model.image_mean, image_std=model.image_std")
        mean = self.hparams.image_mean or (model.image_mean if model is not None else None) or CLIP_MEAN
        std = self.hparams.image_std or (model.image_std if model is not None else None) or CLIP_STD
        return tuple(mean), tuple(std)

    def _model(self) -> DataConsumer | None:
        return self.trainer.lightning_module if self.trainer is not None else None


def add_location_tokens(tokenizer: PreTrainedTokenizerBase, bins: int) -> int:
    """Add the grounding vocabulary to a tokenizer (models must size embeddings from ``len(tokenizer)``)."""
    return tokenizer.add_tokens(list(location_tokens(bins)))


def _require_count(sources: list[ShardSource]) -> int:
    counts = [source.num_samples() for source in sources]
    if None in counts:
        raise ValueError("set samples_per_epoch: the shard sources have no dataset.json with sample counts")
    return sum(counts)


def ensure_default_benchmark(root: str | Path, wait_s: float = 600.0) -> None:
    """Generate the synthetic benchmark at its default place if that is where `root` points and it is absent, or
    add the default splits it lacks (a benchmark generated before they existed).

    One process generates (global rank 0, into a temporary folder renamed when complete, or new splits' shards
    then the manifest, replaced atomically); the other ranks of a multi-process launch wait for it.
    """
    root = Path(root)
    if root.resolve() != DEFAULT_ROOT.resolve() or not missing_splits(root):
        return
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0:
        deadline = time.monotonic() + wait_s
        while missing_splits(root):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not finish generating {root} within {wait_s:.0f} s")
            time.sleep(1.0)
        return
    if (root / MANIFEST).is_file():
        print(f"[lightning_vlm] {root} lacks the split(s) {', '.join(missing_splits(root))}: generating them there")
        add_splits(root)
        return
    print(f"[lightning_vlm] {root} is missing: generating the synthetic benchmark there first")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    generate_benchmark(partial)
    partial.rename(root)
