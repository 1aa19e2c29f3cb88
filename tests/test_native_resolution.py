"""Native resolution and tiling (issue 31, item 6): images kept at their own aspect ratio, bucketed and padded with a
pixel mask (data side); Fuyu's raw patches with image-newline tokens and LLaVA-NeXT's AnyRes tiles (model side).
The defining property: an image gives the same tokens, and its text the same predictions, in a batch of images of
other sizes as alone."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_vlm.adapters import MLP, Linear
from lightning_vlm.compare.cells import cell_config
from lightning_vlm.compare.config import load_comparison
from lightning_vlm.compare.run import check_entries
from lightning_vlm.data.collate import Collator, Example, first_rows, pad_images
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.sources import ShardSource
from lightning_vlm.data.stream import ShardStream, StreamConfig
from lightning_vlm.data.tasks import TextExample
from lightning_vlm.data.tools.convert import convert_image_folder
from lightning_vlm.data.transforms import ImageTransform, aspect_size
from lightning_vlm.encoders import RawPatches, VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.models.anyres import AnyRes, best_grid
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.models.visual_prompt import grid_layout, place_images
from lightning_vlm.paradigms.generative import ImageToText
from lightning_vlm.tokens import IMAGE_TOKEN

REPO = Path(__file__).parents[1]
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}
TINY_VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
# (width, height) of the converted images: squares, landscapes and portraits, some not multiples of anything.
SIZES = [(64, 64), (96, 48), (40, 80), (128, 32), (50, 70), (33, 65), (64, 64), (100, 60)] * 3
# The digest of the batches the pipeline gave on these shards before native resolution existed (keep_aspect off).
BEFORE_NATIVE_RESOLUTION = "47e083452e92ceee18591a36a254f1d84b48cb3d"


@pytest.fixture(scope="module")
def sized_shards(tmp_path_factory) -> Path:
    """Shards converted by `data convert folder`'s function from PIL images of several sizes and aspect ratios."""
    tmp = tmp_path_factory.mktemp("sized")
    folder, rows = tmp / "images", []
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i, (width, height) in enumerate(SIZES):
        Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "caption": f"a picture number {i % 5} left of the circle"})
    with open(tmp / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    for split in ("train", "val"):
        convert_image_folder(folder, tmp / "captions.csv", tmp / "out", samples_per_shard=7, split=split)
    return tmp / "out"


def original_size(meta: dict) -> tuple[int, int]:
    """(width, height) of a converted sample's source image."""
    return SIZES[int(meta["source"][2:-4])]


def data(root: Path, tokenizer: str | None, **settings) -> ShardDataModule:
    settings = {"batch_size": 4, "image_size": 32, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3, **settings}
    return ShardDataModule(root=str(root), tokenizer=tokenizer, val_splits=["val"], test_splits=[], **settings)


# ---- data side ------------------------------------------------------------------------------------------------------
def test_with_the_option_off_the_batches_are_those_of_the_pipeline_before_it(sized_shards, tiny_benchmark):
    dm = data(sized_shards, tiny_benchmark, hflip=0.5, shuffle_buffer=8)
    batches = list(dm.train_dataloader()) + list(dm.eval_loader("val"))
    digest = hashlib.sha1()
    for batch in batches:
        assert "pixel_mask" not in batch and batch["pixel_values"].shape[1:] == (3, 32, 32)
        digest.update(batch["pixel_values"].numpy().tobytes())
        digest.update(repr([meta["key"] for meta in batch["meta"]]).encode())
    assert digest.hexdigest() == BEFORE_NATIVE_RESOLUTION


def test_aspect_size_keeps_the_ratio_fits_the_longer_side_and_rounds_to_the_patch():
    assert aspect_size(64, 64, 32, 8) == (32, 32)  # (height, width)
    assert aspect_size(96, 48, 32, 8) == (16, 32)
    assert aspect_size(40, 80, 32, 8) == (32, 16)
    assert aspect_size(128, 32, 32, 8) == (8, 32)
    assert aspect_size(1000, 10, 32, 8) == (8, 32)  # never below one patch
    assert aspect_size(50, 70, 64) == (64, 46)


def test_keep_aspect_resizes_boxes_with_the_image():
    sample = RawSample("k", Image.new("RGB", (80, 40)), "", {"objects": [{"box": [40, 0, 80, 20]}]})
    pixels, out, _ = ImageTransform(32, keep_aspect=True, size_multiple=8)(sample, random.Random(0))
    assert pixels.shape == (3, 16, 32)
    assert out.info["objects"][0]["box"] == [16.0, 0.0, 32.0, 8.0]


def test_batches_are_padded_with_a_mask_of_each_images_own_pixels(sized_shards, tiny_benchmark):
    dm = data(sized_shards, tiny_benchmark, keep_aspect=True, size_multiple=8, bucket_window=0, eval_batch_size=2)
    train, evaluation = list(dm.train_dataloader()), list(dm.eval_loader("val"))
    for batch in train + evaluation:
        pixels, mask = batch["pixel_values"], batch["pixel_mask"]
        assert mask.shape == (len(pixels), *pixels.shape[-2:])
        for image, own, meta in zip(pixels, mask, batch["meta"]):
            height, width = aspect_size(*original_size(meta), 32, 8)
            assert own[:height, :width].all() and own.sum() == height * width  # its own block, top left
            assert image[:, own].isfinite().all() and image[:, ~own].isnan().all()
    for batch in train:  # padded to the batch's largest image
        sizes = [aspect_size(*original_size(meta), 32, 8) for meta in batch["meta"]]
        assert batch["pixel_values"].shape[-2:] == tuple(map(max, zip(*sizes)))
    assert all(batch["pixel_values"].shape[-2:] == (32, 32) for batch in evaluation)  # stackable across batches


def test_bucketing_groups_by_size_and_loses_or_duplicates_no_sample(sized_shards, tiny_benchmark):
    dm = data(sized_shards, tiny_benchmark, keep_aspect=True, size_multiple=8)
    base: ShardStream = dm.eval_loader("train").dataset
    collate = replace(base.collate, pad_to=None)  # as training pads: to the batch's largest image

    def batches(window: int) -> list[dict]:
        config = StreamConfig(batch_size=4, bucket_window=window, seed=1)
        return list(ShardStream([ShardSource(str(sized_shards), split="train")], base.transform, base.formatter,
                                collate, config))

    plain, bucketed = batches(0), batches(6)  # one window of 24: the whole split
    keys = Counter(meta["key"] for batch in plain for meta in batch["meta"])
    assert sorted(keys) == [f"{i:09d}" for i in range(len(SIZES))] and set(keys.values()) == {1}
    assert Counter(meta["key"] for batch in bucketed for meta in batch["meta"]) == keys
    sizes = [sorted((int(own[:, 0].sum()), int(own[0].sum())) for own in batch["pixel_mask"]) for batch in bucketed]
    assert [size for batch in sorted(sizes) for size in batch] == sorted(size for batch in sizes for size in batch)
    padding = [sum(int((~batch["pixel_mask"]).sum()) for batch in run) for run in (plain, bucketed)]
    assert padding[1] < padding[0] / 2, padding  # each batch a run of neighbouring sizes: little padding


def test_bucketed_training_keeps_the_number_of_batches(sized_shards, tiny_benchmark):
    plain = data(sized_shards, tiny_benchmark, batch_size=5)
    bucketed = data(sized_shards, tiny_benchmark, batch_size=5, keep_aspect=True, size_multiple=8, bucket_window=2)
    assert len(list(plain.train_dataloader())) == len(list(bucketed.train_dataloader())) == len(SIZES) // 5


# ---- model side -----------------------------------------------------------------------------------------------------
def layout_by_hand():
    """A 3 x 4 grid of scalar tokens 1..12 whose image is its top-left 2 x 3 block, newline -1."""
    tokens = torch.arange(1.0, 13.0).view(1, 12, 1)
    valid = torch.zeros(1, 3, 4, dtype=torch.bool)
    valid[:, :2, :3] = True
    return grid_layout(tokens, (3, 4), valid.flatten(1), torch.tensor([-1.0]))


def test_newline_tokens_end_every_row_of_the_image_and_padding_gives_none():
    laid_out, lengths = layout_by_hand()
    assert lengths.tolist() == [8]
    assert laid_out[0, :, 0].tolist() == [1, 2, 3, -1, 5, 6, 7, -1]
    full, full_lengths = grid_layout(torch.arange(1.0, 7.0).view(1, 6, 1), (2, 3), newline=torch.tensor([0.0]))
    assert full[0, :, 0].tolist() == [1, 2, 3, 0, 4, 5, 6, 0] and full_lengths.tolist() == [8]


@pytest.fixture(scope="module")
def lm(tiny_benchmark) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM).eval()


def fuyu(lm: LanguageModel, newline: bool = True) -> LLaVA:
    torch.manual_seed(0)
    return LLaVA(RawPatches(8), lm, Linear(), image_newline=newline).eval()


def llava_next(lm: LanguageModel) -> LLaVA:
    torch.manual_seed(0)
    vit = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT)
    return LLaVA(vit, lm, MLP(), image_newline=True, anyres=AnyRes(tile_size=32)).eval()


def test_fuyu_tokens_per_image_follow_its_size_with_a_newline_after_each_patch_row(lm):
    model = fuyu(lm)
    for height, width in [(32, 32), (16, 32), (32, 8), (24, 40)]:
        tokens, lengths = model.image_tokens(torch.randn(1, 3, height, width))
        rows, cols = height // 8, width // 8
        assert lengths.tolist() == [rows * (cols + 1)]
        ends = [row * (cols + 1) + cols for row in range(rows)]
        assert all(torch.equal(tokens[0, i], model.image_newline) for i in ends)
        assert not any(torch.equal(tokens[0, i], model.image_newline) for i in range(len(tokens[0])) if i not in ends)


def logits_of(output) -> torch.Tensor:
    """(B, L, V) the LM's logits at every position of a `NextTokenOutput`."""
    return output.head(output.hidden)


@pytest.mark.parametrize("build", [fuyu, llava_next], ids=["fuyu-native", "llava-anyres"])
def test_images_of_different_sizes_in_one_batch_give_what_each_gives_alone(lm, build):
    model = build(lm)
    images = [torch.randn(3, 16, 40), torch.randn(3, 48, 24), torch.randn(3, 32, 32)]
    texts = [TextExample("caption", "", "a red square"), TextExample("vqa", "what colour is it?", "blue"),
             TextExample("caption", "", "a circle left of a small green triangle")]
    collate = Collator(lm.tokenizer, image_token=IMAGE_TOKEN, pad_images=True)
    batch = collate([Example(image, text) for image, text in zip(images, texts)])
    assert batch["pixel_values"].shape[-2:] == (48, 40)
    with torch.no_grad():
        tokens, lengths = model.image_tokens(batch["pixel_values"])
        together = model.interleave(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        logits = logits_of(model.predict_text(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                              batch["labels"]))
        for row, (image, text) in enumerate(zip(images, texts)):
            alone = collate([Example(image, text)])
            assert "pixel_mask" in alone and alone["pixel_mask"].all()
            own_tokens, own_length = model.image_tokens(alone["pixel_values"])
            assert lengths[row] == own_length[0] == own_tokens.shape[1]
            torch.testing.assert_close(tokens[row, : lengths[row]], own_tokens[0], atol=1e-5, rtol=1e-5)
            assert not tokens[row, lengths[row]:].any()
            sequence = model.interleave(alone["pixel_values"], alone["input_ids"], alone["attention_mask"])
            real = together.mask[row].bool()
            assert real.sum() == sequence.mask.sum()  # padding gave no image token
            assert torch.equal(together.image_slot[row, real], sequence.image_slot[0])
            own_logits = logits_of(model.predict_text(alone["pixel_values"], alone["input_ids"],
                                                      alone["attention_mask"], alone["labels"]))
            text = sequence.image_slot[0] < 0
            torch.testing.assert_close(logits[row, real][text], own_logits[0][text], atol=1e-4, rtol=1e-4)


def test_generation_from_a_padded_batch_answers_as_each_image_alone(lm):
    model = fuyu(lm)
    images = [torch.randn(3, 16, 40), torch.randn(3, 40, 16)]
    ids, mask = Collator(lm.tokenizer, image_token=IMAGE_TOKEN).prompts(["what is it?"] * 2)
    pixels, _ = pad_images(images)
    together = model.generate(pixels, ids, mask, max_new_tokens=4, do_sample=False)
    for row, image in enumerate(images):
        alone = model.generate(image[None], ids[row:row + 1], mask[row:row + 1], max_new_tokens=4, do_sample=False)
        assert together[row, : alone.shape[1]].tolist() == alone[0].tolist()


@pytest.mark.parametrize(("height", "width", "grid"), [
    (64, 64, (1, 1)),  # fits one tile exactly
    (64, 96, (1, 2)),  # 3:2 landscape: two tiles side by side keep every pixel and waste least
    (80, 40, (2, 1)),  # 1:2 portrait
    (32, 128, (1, 2)),  # 1:4: (1, 3) keeps as many pixels but wastes more
    (64, 192, (1, 3)),  # 1:3 exactly
    (200, 200, (2, 2)),  # a large square: the most pixels kept
])
def test_anyres_picks_the_grid_that_keeps_most_pixels_with_least_waste(height, width, grid):
    assert best_grid(height, width, 64, AnyRes().grids) == grid
    assert best_grid(height, width, 64, AnyRes().grids[::-1]) == grid  # whatever the order of the allowed grids


def test_anyres_tiles_are_the_canvas_cut_in_raster_order_after_an_overview():
    image = torch.randn(3, 32, 48)
    tiles, grid = AnyRes(tile_size=32).tiles(image)
    assert grid == (1, 2) and tiles.shape == (3, 3, 32, 32)
    torch.testing.assert_close(tiles[0], F.interpolate(image[None], size=(32, 32), mode="bilinear",
                                                       antialias=True)[0])
    canvas = F.interpolate(image[None], size=(32, 64), mode="bilinear", antialias=True)[0]
    assert torch.equal(tiles[1], canvas[:, :, :32]) and torch.equal(tiles[2], canvas[:, :, 32:])


@pytest.mark.parametrize(("height", "width", "rows", "cols"), [(32, 32, 2, 2), (32, 48, 2, 4), (64, 64, 4, 4)])
def test_anyres_tokens_are_the_overview_then_the_tiles_grid_with_newlines(lm, height, width, rows, cols):
    model = llava_next(lm)  # a 32 px tile gives the ViT a 2 x 2 grid: 4 tokens; (rows, cols) of the tiles' tokens
    image = torch.randn(1, 3, height, width)
    with torch.no_grad():
        tokens, lengths = model.image_tokens(image)
        overview = model.projected(F.interpolate(image, size=(32, 32), mode="bilinear", antialias=True))
    assert lengths.tolist() == [4 + rows * (cols + 1)] == [tokens.shape[1]]
    torch.testing.assert_close(tokens[0, :4], overview[0])
    ends = [4 + row * (cols + 1) + cols for row in range(rows)]
    assert all(torch.equal(tokens[0, i], model.image_newline) for i in ends)
    assert sum(torch.equal(token, model.image_newline) for token in tokens[0]) == rows


def test_with_the_options_off_llava_and_placement_are_unchanged(lm):
    model = fuyu(lm, newline=False)
    images = torch.randn(2, 3, 32, 32)
    tokens, lengths = model.image_tokens(images)
    assert lengths is None and torch.equal(tokens, model.projector(RawPatches(8)(images).patch_tokens))
    ids = torch.tensor([[1, lm.image_token_id, 5, 6], [1, 7, lm.image_token_id, 2]])
    embeds, mask = lm.embed(ids), torch.ones_like(ids)
    plain = place_images(tokens, embeds, ids, mask, lm.image_token_id)
    counted = place_images(tokens, embeds, ids, mask, lm.image_token_id, lengths=torch.tensor([16, 16]))
    assert all(torch.equal(getattr(plain, f), getattr(counted, f)) for f in ("embeds", "mask", "image_slot"))


def test_fuyu_native_trains_and_evaluates_on_images_of_many_sizes(sized_shards, tiny_benchmark, lm, tmp_path):
    model = ImageToText(fuyu(lm).train(), lr=1e-3, warmup_steps=1)
    newline = model.model.image_newline.detach().clone()
    # the LM's tokenizer (it has <image>); pairs of images for evaluation: the third pair's largest is 32 x 24
    dm = data(sized_shards, None, keep_aspect=True, size_multiple=8, eval_batch_size=2)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append((outputs["loss"].item(), tuple(batch["pixel_values"].shape[-2:])))

    trainer = L.Trainer(max_steps=4, val_check_interval=4, limit_val_batches=3, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Record()])
    trainer.fit(model, dm)
    assert len(losses) == 4 and all(np.isfinite(loss) for loss, _ in losses)
    assert len({shape for _, shape in losses}) > 1  # batches of different sizes
    assert not torch.equal(model.model.image_newline.detach(), newline)  # the newline embedding learns
    assert torch.isfinite(trainer.callback_metrics["val/loss"])  # evaluated: generation, likelihoods, loss


def test_first_rows_keep_each_images_mask_with_its_pixels():
    pixels, mask = pad_images([torch.randn(3, 8, 16), torch.randn(3, 16, 8), torch.randn(3, 8, 8)])
    batch = {"pixel_values": pixels, "pixel_mask": mask, "image_index": torch.tensor([[2, 0], [1, -1], [2, -1]]),
             "meta": [{}, {}, {}]}
    rows = first_rows(batch, 1)  # example 0 shows image 2 (a demonstration) before its own
    assert rows["image_index"].tolist() == [[1, 0]]
    assert torch.equal(rows["pixel_mask"], mask[[0, 2]])
    assert torch.equal(rows["pixel_values"].isnan(), pixels[[0, 2]].isnan())


def test_the_fuyu_native_entry_is_fuyu_frozen_with_newlines_read_at_native_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the comparison names its recipes from the checkout's root
    comparison = load_comparison(REPO / "comparisons" / "fusion.yaml")
    entries = {entry.label: entry for entry in comparison.entries}
    native, frozen = (cell_config(comparison, entries[label], 0, tmp_path) for label in ("fuyu-native", "fuyu-frozen"))
    native_model = native["model"]["init_args"]["model"]["init_args"]
    assert native_model.pop("image_newline") is True
    assert [native["data"]["init_args"].pop(key) for key in ("keep_aspect", "size_multiple", "bucket_window")] == [
        True, native_model["vision"]["init_args"]["patch_size"], 0]
    assert json.dumps(native).replace("fuyu-native", "fuyu-frozen") == json.dumps(frozen)  # nothing else differs
    assert "vqa" in check_entries(comparison, tmp_path, [entries["fuyu-native"]])["fuyu-native"]  # it builds
