"""The streaming DataModule: batch dict, label masks, bad data, rank/worker splitting, epochs, mixing, flips."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_vlm.data.collate import Collator, Example
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.sources import ShardSource
from lightning_vlm.data.stream import ShardStream, StreamConfig, StreamPosition, make_loader
from lightning_vlm.data.synthetic.language import object_caption
from lightning_vlm.data.tasks import TextExample
from lightning_vlm.data.transforms import hflip_sample, swap_left_right
from lightning_vlm.errors import MissingInputError
from lightning_vlm.tokens import IGNORE_INDEX


def keys_of(loader) -> list[str]:
    return [meta["key"] for batch in loader for meta in batch["meta"]]


def stream(dm: ShardDataModule, sources, config: StreamConfig, rank=0, world=1) -> ShardStream:
    loader = dm.eval_loader("val")  # builds transform/formatter/collate exactly as the module does
    base: ShardStream = loader.dataset
    return ShardStream(sources, base.transform, base.formatter, base.collate, config, rank, world)


def test_batch_dict_and_labels_only_on_targets(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1, "vqa": 1, "contrastive": 1}, batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (16, 3, 64, 64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    tok = dm.tokenizer
    for ids, labels, mask, meta in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], batch["meta"]):
        real = ids[mask.bool()]
        assert real[0] == tok.bos_token_id and real[-1] == tok.eos_token_id
        supervised = labels != IGNORE_INDEX
        if meta["task"] == "contrastive":
            assert not supervised.any()
            continue
        assert torch.equal(labels[supervised], ids[supervised])  # unshifted copy
        expected = tok.encode(meta["target"], add_special_tokens=False) + [tok.eos_token_id]
        assert labels[supervised].tolist() == expected  # exactly the target and EOS
        assert not (supervised & ~mask.bool()).any()  # never on padding


@pytest.mark.parametrize("max_length", [6, 9, 12])
def test_truncation_keeps_the_end_token_and_labels_equal_to_ids(tiny_benchmark, max_length):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1.0}, batch_size=32, max_length=max_length)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert batch["input_ids"].shape[1] <= max_length
    for ids, labels, mask, meta in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], batch["meta"]):
        real, lab = ids[mask.bool()], labels[mask.bool()]
        assert real[-1] == tok.eos_token_id
        supervised = lab != IGNORE_INDEX
        assert torch.equal(lab[supervised], real[supervised])
        prompt_length = 1 + len(tok.encode(meta["prompt"], add_special_tokens=False))
        assert not supervised[:prompt_length].any() and supervised[prompt_length:].all()


@pytest.mark.parametrize("max_length", [8, 64])
def test_batched_tokenize_lays_out_each_text_as_encoding_it_alone_does(tiny_benchmark, max_length):
    """`tokenize` (hard negatives, evaluation prompts) encodes a batch in one call; each row must be the contrastive
    layout `encode` gives that text alone, truncation included."""
    collate = ShardDataModule(root=tiny_benchmark).eval_loader("val").dataset.collate
    collate = Collator(collate.tokenizer, max_length)
    texts = ["a small red circle left of a large blue square. the word cat is written.", "", "a large star."]
    input_ids, attention_mask = collate.tokenize(texts)
    for row, text in enumerate(texts):
        alone, _ = collate.encode(TextExample("contrastive", "", text))
        assert input_ids[row, : len(alone)].tolist() == alone and attention_mask[row].sum() == len(alone)
    assert input_ids.shape[1] == min(max_length, attention_mask.sum(1).max())


def test_a_mixed_batch_collates_each_text_as_encoding_it_alone_does(tiny_benchmark):
    """Plain captions are tokenised together in one call, every other text alone: the rows, labels and padding
    must be those of `encode` on each text, in the batch's order."""
    collate = ShardDataModule(root=tiny_benchmark).eval_loader("val").dataset.collate
    texts = [TextExample("contrastive", "", "a large star."), TextExample("vqa", "what shape?", "star"),
             TextExample("contrastive", "", "a small red circle left of a large blue square."),
             TextExample("contrastive", "", "a cross.", system="describe")]
    batch = collate([Example(torch.zeros(3, 8, 8), text) for text in texts])
    for row, text in enumerate(texts):
        ids, labels = collate.encode(text)
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids and batch["labels"][row, :n].tolist() == labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][row, n:] == collate.pad_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_vqa_targets_are_answers_of_the_sample(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1.0}, batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    for meta in batch["meta"]:
        assert {"question": meta["prompt"], "answer": meta["target"], "skill": meta["skill"]} in meta["qa"]


def test_hard_negatives_are_the_samples_own_swaps_in_training_only(tiny_benchmark):
    k = 4  # one-object scenes have 3 swaps (no relation): their fourth slot is padding
    dm = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1.0}, batch_size=16, hard_negatives=k, hflip=0.5)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert batch["negative_input_ids"].shape[0] == batch["negative_valid"].shape[0] == 16 * k
    texts = tok.batch_decode(batch["negative_input_ids"], skip_special_tokens=True)
    for i, meta in enumerate(batch["meta"]):
        swaps = {neg["caption"] for neg in meta["hard_negatives"]}  # the json's swaps, mirrored with the image
        own = [t for t, v in zip(texts[k * i:k * i + k], batch["negative_valid"][k * i:k * i + k]) if v]
        assert len(own) == min(k, len(swaps)) and len(set(own)) == len(own)  # drawn without replacement
        assert {t.replace(" .", ".") for t in own} <= {_spaced(c, tok) for c in swaps}
    assert not batch["negative_valid"].all()
    assert "negative_input_ids" not in next(iter(dm.val_dataloader()[0]))  # eval losses stay the plain ones


def test_blind_evaluation_zeroes_every_image_and_keeps_the_text_while_training_sees_images(tiny_benchmark):
    seeing = ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1.0}, batch_size=16)
    blind = ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1.0}, batch_size=16, blind=True)
    seen, unseen = next(iter(seeing.eval_loader("val"))), next(iter(blind.eval_loader("val")))
    assert seen["pixel_values"].abs().sum() > 0 and torch.count_nonzero(unseen["pixel_values"]) == 0
    assert torch.equal(seen["input_ids"], unseen["input_ids"]) and torch.equal(seen["labels"], unseen["labels"])
    assert torch.count_nonzero(next(iter(blind.train_dataloader()))["pixel_values"]) > 0


def test_object_captions_caption_a_scene_of_several_objects_by_one_of_them_in_training_only(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1.0}, batch_size=32, object_captions=1.0,
                         hard_negatives=2, hflip=0.5)
    batch = next(iter(dm.train_dataloader()))
    texts = dm.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    several = 0
    for text, meta in zip(texts, batch["meta"]):
        objects = meta["objects"]
        if len(objects) == 1:
            assert meta["target"] == meta["caption"]
            continue
        several += 1
        assert meta["target"] in {object_caption(obj, meta.get("word")) for obj in objects}
        assert text.replace(" .", ".") == _spaced(meta["target"], dm.tokenizer)  # what the model reads
    assert several > 0
    assert batch["negative_valid"].shape == (32 * 2,)  # the scene's own swaps still: false of the image as a whole
    eval_meta = next(iter(dm.val_dataloader()[0]))["meta"]
    assert all(meta["target"] == meta["caption"] for meta in eval_meta)
    plain = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1.0}, batch_size=32, hflip=0.5)
    assert all(m["target"] == m["caption"] for m in next(iter(plain.train_dataloader()))["meta"])


def test_object_caption_is_worded_as_the_scene_captions_name_an_object():
    obj = {"size": "small", "color": "red", "shape": "circle", "box": [0, 0, 1, 1]}
    assert object_caption(obj, None) == "a small red circle."
    assert object_caption(obj, "cup") == "a small red circle. the word cup is written."


def _spaced(caption: str, tok) -> str:
    """A caption as decoding its tokens writes it back."""
    return tok.decode(tok.encode(caption, add_special_tokens=False)).replace(" .", ".")


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def bad_shards(tmp_path) -> Path:
    """Shard 0: 3 good, 1 corrupt jpg, 1 without txt. Shard 1: 2 good then a member cut off mid-file."""
    good = lambda k: [(f"{k}.jpg", _jpeg()), (f"{k}.txt", b"a red square.")]  # noqa: E731
    _tar(tmp_path / "a.tar", good("s0") + good("s1") + [("s2.jpg", b"not a jpeg"), ("s2.txt", b"x")]
         + [("s3.jpg", _jpeg())] + good("s4"))
    _tar(tmp_path / "b.tar", good("t0") + good("t1") + good("t2"))
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("t2.txt").offset_data + 5
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes()[:cut])  # t2.txt's data cut short
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tiny_benchmark, bad_shards, workers):
    dm = ShardDataModule(root=tiny_benchmark, train=str(bad_shards), batch_size=1, num_workers=workers,
                         shuffle_buffer=0)
    dm.setup()
    loader = make_loader(stream(dm, [ShardSource(str(bad_shards))], StreamConfig(batch_size=1)), workers)
    batches = list(loader)
    keys = sorted(meta["key"] for b in batches for meta in b["meta"])
    assert keys == ["s0", "s1", "s4", "t0", "t1"]
    assert sum(b["num_skipped"] for b in batches) == 3  # corrupt jpg, missing txt, the truncated sample
    assert sum(b["num_read_errors"] for b in batches) >= 1  # the truncated member


@pytest.mark.parametrize("split", ["train", "val"])  # train: 4 shards (split by shard); val: 1 (split by sample)
def test_two_ranks_two_workers_read_disjoint_samples_covering_the_epoch(tiny_benchmark, split):
    dm = ShardDataModule(root=tiny_benchmark, batch_size=8, shuffle_buffer=32)
    config = StreamConfig(batch_size=8, shuffle_buffer=32)
    per_rank = [keys_of(make_loader(stream(dm, [ShardSource(tiny_benchmark, split=split)], config, rank, 2), 2))
                for rank in range(2)]
    everything = json.loads((Path(tiny_benchmark) / "dataset.json").read_text())["counts"][split]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == len(set(per_rank[0]) | set(per_rank[1])) == everything


def test_explicit_epoch_size_gives_every_rank_the_same_steps(tiny_benchmark):
    config = StreamConfig(batch_size=8, shuffle_buffer=16, samples_per_epoch=100)
    dm = ShardDataModule(root=tiny_benchmark)
    for rank in range(2):
        loader = make_loader(stream(dm, [ShardSource(tiny_benchmark, split="val")], config, rank, 2), 2)
        assert len(loader) == 12
        assert [len(b["meta"]) for b in loader] == [8] * 12


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_reshuffle_and_runs_repeat(tiny_benchmark, workers):
    def orders():
        dm = ShardDataModule(root=tiny_benchmark, batch_size=32, shuffle_buffer=64, num_workers=workers)
        loader = dm.train_dataloader()
        return keys_of(loader), keys_of(loader)

    first, second = orders()
    assert first != second and sorted(first) == sorted(second)
    assert orders() == (first, second)


def test_a_resumed_run_reads_its_epoch_in_the_same_order(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, batch_size=32, shuffle_buffer=64)
    counted = dm.train_dataloader()
    epochs = [keys_of(counted) for _ in range(3)]
    resumed = make_loader(counted.dataset, 0, lambda: StreamPosition(2))  # as a run restored at epoch 2 asks
    assert keys_of(resumed) == epochs[2] != epochs[1]


def test_eval_order_is_the_same_at_every_validation(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1.0}, batch_size=16)
    loader = dm.eval_loader("val")
    first = [(m["key"], m["prompt"]) for b in loader for m in b["meta"]]
    assert first == [(m["key"], m["prompt"]) for b in loader for m in b["meta"]]


def test_weighted_sources_mix_by_weight(tiny_benchmark):
    sources = [ShardSource(tiny_benchmark, weight=3.0, split="train"),
               ShardSource(tiny_benchmark, weight=1.0, split="val")]
    dm = ShardDataModule(root=tiny_benchmark)
    loader = make_loader(stream(dm, sources, StreamConfig(batch_size=16, samples_per_epoch=160)), 0)
    keys = keys_of(loader)
    from_train = sum(k.startswith("train") for k in keys) / len(keys)
    assert len(keys) == 160 and 0.6 < from_train < 0.9


def test_grouped_batches_hold_one_task_and_pad_less_without_losing_a_sample(tiny_benchmark):
    def epoch(group_by_task: bool, drop_last: bool = False) -> list[dict]:
        dm = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1.0, "vqa": 3.0})
        config = StreamConfig(batch_size=8, shuffle_buffer=32, drop_last=drop_last, group_by_task=group_by_task)
        return list(make_loader(stream(dm, [ShardSource(tiny_benchmark, split="train")], config), 0))

    mixed, grouped = epoch(False), epoch(True)
    tasks = [[meta["task"] for meta in batch["meta"]] for batch in grouped]
    assert all(len(set(batch)) == 1 for batch in tasks)
    assert any(len({meta["task"] for meta in batch["meta"]}) == 2 for batch in mixed)  # the default mixes
    assert sorted(keys_of(grouped)) == sorted(keys_of(mixed))  # the same draws, only batched differently
    assert sum(len(batch) < 8 for batch in tasks) == 2  # one partial batch per task, at the end of the epoch
    assert sum(b["input_ids"].numel() for b in grouped) < 0.85 * sum(b["input_ids"].numel() for b in mixed)
    assert all(len(batch["meta"]) == 8 for batch in epoch(True, drop_last=True))


def test_moving_a_batch_leaves_its_metadata_unwalked(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1.0, "vqa": 1.0}, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    meta, pixels = batch["meta"], batch["pixel_values"]
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved["meta"] is meta  # the same list of dicts, not a rebuilt copy
    assert torch.equal(moved["pixel_values"], pixels) and set(moved) == set(batch)


def test_flip_swaps_left_and_right_and_mirrors_boxes():
    assert swap_left_right("a red circle left of a blue square. Right?") == "a red circle right of a blue square. Left?"
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 0, 0), (0, 0, 10, 10))
    info = {"objects": [{"shape": "square", "color": "red", "size": "small", "box": [0, 0, 10, 10]}],
            "qa": [{"question": "Is the red square left of the blue circle?", "answer": "yes", "skill": "spatial"}]}
    flipped = hflip_sample(RawSample("k", image, "a red square left of a blue circle.", info))
    assert flipped.caption == "a red square right of a blue circle."
    assert flipped.info["qa"][0]["question"] == "Is the red square right of the blue circle?"
    assert flipped.info["objects"][0]["box"] == [54, 0, 64, 10]
    assert flipped.image.getpixel((60, 5)) == (255, 0, 0) and flipped.image.getpixel((5, 5)) == (0, 0, 0)
    assert info["objects"][0]["box"] == [0, 0, 10, 10]  # the original is untouched


def test_flip_is_applied_in_the_stream_and_never_to_written_words(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, batch_size=64, hflip=1.0)
    batch = next(iter(dm.train_dataloader()))
    for meta in batch["meta"]:
        assert meta["flipped"] == (not meta.get("word"))
    assert any(m["flipped"] for m in batch["meta"])


def test_grounding_targets_are_location_tokens_of_the_named_object(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"grounding": 1.0}, batch_size=16, loc_bins=32)
    batch = next(iter(dm.train_dataloader()))
    for labels, meta in zip(batch["labels"], batch["meta"]):
        tokens = dm.tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())
        expected = [f"<loc_{min(31, int(c / 64 * 32)):02d}>" for c in meta["box"]]
        assert tokens == expected + [dm.tokenizer.eos_token]


def test_grounding_with_a_tokenizer_lacking_location_tokens_is_a_clear_error(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tokenizer=tiny_benchmark, tasks={"grounding": 1.0})
    with pytest.raises(ValueError, match="32 location tokens"):
        dm.setup()


def test_asking_for_a_split_the_data_lacks_is_a_clear_error_before_training(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, val_splits=["val", "minival"])
    with pytest.raises(ValueError, match="minival"):
        dm.setup()


def test_png_webp_and_jpg_shards_decode_to_the_same_batch(tiny_benchmark, tmp_path):
    from lightning_vlm.data.tools.convert import convert_image_folder

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for fmt in ("png", "webp", "jpeg"):
        Image.new("RGB", (64, 64), "red").save(images / f"red.{fmt}", format=fmt.upper())
        rows.append(f"red.{fmt},a large red square.")
    (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    convert_image_folder(images, tmp_path / "captions.csv", tmp_path / "out")
    dm = ShardDataModule(root=str(tmp_path / "out"), tokenizer=tiny_benchmark, val_splits=[], test_splits=[],
                         batch_size=3, shuffle_buffer=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["num_skipped"] == 0
    assert torch.allclose(batch["pixel_values"][0], batch["pixel_values"][1], atol=0.05)  # lossless vs lossy


def test_system_prompt_precedes_every_generative_prompt_and_carries_no_labels(tiny_benchmark):
    system = "answer in one word."
    dm = ShardDataModule(root=tiny_benchmark, tasks={"vqa": 1.0, "caption": 1.0, "contrastive": 1.0}, batch_size=16,
                         system_prompt=system, caption_prompt="describe the image.")
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    for ids, labels, meta in zip(batch["input_ids"], batch["labels"], batch["meta"]):
        if meta["task"] == "contrastive":
            assert not meta["prompt"] and (labels == IGNORE_INDEX).all()
            continue
        assert meta["system"] == system
        words = tok.decode(ids[1:], skip_special_tokens=True)
        assert words.startswith(system.rstrip(".")), words  # plain layout: the system text opens the sequence
        expected = tok.encode(meta["target"], add_special_tokens=False) + [tok.eos_token_id]
        assert labels[labels != IGNORE_INDEX].tolist() == expected


def test_train_fraction_reads_the_first_shards_only(tiny_benchmark):
    manifest = json.loads((Path(tiny_benchmark) / "dataset.json").read_text())
    first_two = [str(Path(tiny_benchmark) / shard) for shard in manifest["splits"]["train"][:2]]  # of 4
    dm = ShardDataModule(root=tiny_benchmark, batch_size=8, shuffle_buffer=16)
    expected = keys_of(make_loader(stream(dm, [ShardSource(first_two)], StreamConfig(batch_size=8)), 0))
    half = ShardDataModule(root=tiny_benchmark, batch_size=8, shuffle_buffer=16, train_fraction=0.5)
    assert sorted(keys_of(half.train_dataloader())) == sorted(expected) and len(expected) == 128
    assert ShardSource(tiny_benchmark, split="train", fraction=0.3).num_samples() == 128  # ceil(0.3 * 4) shards
    with pytest.raises(ValueError, match="fraction"):
        ShardSource(tiny_benchmark, split="train", fraction=0.0).urls()


@pytest.fixture
def unimodal_shards(tmp_path) -> Path:
    """images/: 16 images without captions; texts/: 16 captions without images."""
    (tmp_path / "images").mkdir()
    (tmp_path / "texts").mkdir()
    _tar(tmp_path / "images" / "i.tar", [(f"i{k:02d}.jpg", _jpeg()) for k in range(16)])
    _tar(tmp_path / "texts" / "t.tar", [(f"t{k:02d}.txt", f"a red square number {k}.".encode()) for k in range(16)])
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_unimodal_sources_give_whole_batches_of_their_kind(tiny_benchmark, unimodal_shards, workers):
    sources = [ShardSource(tiny_benchmark, split="train", weight=2.0),
               ShardSource(str(unimodal_shards / "images"), modality="image"),
               ShardSource(str(unimodal_shards / "texts"), modality="text")]
    dm = ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1})
    loader = make_loader(stream(dm, sources, StreamConfig(batch_size=4, samples_per_epoch=160)), workers)
    batches = list(loader)
    kinds = [b["modality"] for b in batches]
    def source_of(key: str) -> str:  # keys: train-0000123, i07, t12
        return "pair" if key.startswith("train-") else {"i": "image", "t": "text"}[key[0]]

    for batch in batches:
        assert {source_of(m["key"]) for m in batch["meta"]} == {batch["modality"]}
        if batch["modality"] == "image":
            assert {m["caption"] for m in batch["meta"]} == {""}
        if batch["modality"] == "text":
            assert not batch["pixel_values"].any()  # the stand-in image: zeros, the normalised mean
    assert len(batches) == 40 and 0.3 < kinds.count("pair") / 40 < 0.75 and {"image", "text"} <= set(kinds)
    # every rank draws the same sequence of kinds, so a step's ranks agree (the contrastive gather needs it)
    other_rank = make_loader(stream(dm, sources, StreamConfig(batch_size=4, samples_per_epoch=160), 1, 2), workers)
    assert [b["modality"] for b in other_rank] == kinds


def test_a_source_with_an_unknown_modality_is_refused():
    with pytest.raises(ValueError, match="modality"):
        ShardSource("x", modality="audio")


def test_without_a_model_the_image_statistics_fall_back_to_clip_with_a_warning(tiny_benchmark):
    dm = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1}, batch_size=4)
    with pytest.warns(UserWarning, match="CLIP's statistics"):
        clip_normalised = next(iter(dm.val_dataloader()[0]))["pixel_values"]
    half = ShardDataModule(root=tiny_benchmark, tasks={"caption": 1}, batch_size=4,
                           image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half_normalised = next(iter(half.val_dataloader()[0]))["pixel_values"]
    assert not torch.allclose(clip_normalised, half_normalised)
    assert half_normalised.min() >= -1.0 and half_normalised.max() <= 1.0  # (x - 0.5) / 0.5 of x in [0, 1]


@pytest.mark.parametrize("samples_per_epoch", [None, 8])
def test_data_that_gives_no_batch_fails_naming_why_instead_of_spinning(tiny_benchmark, tmp_path, samples_per_epoch):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"not a tar file")
    dm = ShardDataModule(root=str(tmp_path), tokenizer=tiny_benchmark, batch_size=4,
                         samples_per_epoch=samples_per_epoch)
    with pytest.raises(MissingInputError, match="no sample could be read|gave no batch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        next(iter(dm.train_dataloader()))
