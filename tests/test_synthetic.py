"""The synthetic benchmark: deterministic shards, text that agrees with the scene, held-out pairs, the tokenizer."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from lightning_vlm.data import datamodule
from lightning_vlm.data.synthetic import generate_benchmark
from lightning_vlm.data.synthetic.generator import STYLE_SHIFT, add_splits, make_sample
from lightning_vlm.data.synthetic.language import OPPOSITE, caption, clauses, hard_negatives, holds, questions
from lightning_vlm.data.synthetic.render import render
from lightning_vlm.data.synthetic.scenes import COLORS, HELD_OUT, Scene, SceneObject, sample_scene
from lightning_vlm.data.synthetic.scenes import SIZES as FRACTIONS
from lightning_vlm.data.synthetic.style import (
    DEFAULT_STYLE,
    HUE_JITTER,
    SHIFTED_SIZES,
    VALUE_JITTER,
    jitter,
    nearest_color,
    sample_style,
)
from lightning_vlm.tokens import load_tokenizer

SIZES = {"train": 40, "val": 40, "test": 40, "compositional": 40, "style_shift": 40}
OBJECT = re.compile(r"a (small|large) (\w+) (\w+)")
SPATIAL = re.compile(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?")


def _generate(root: Path, seed: int, num_workers: int) -> Path:
    generate_benchmark(root, SIZES, seed=seed, samples_per_shard=16, num_workers=num_workers)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("a"), seed=0, num_workers=2)


@pytest.fixture(scope="module")
def samples(root: Path) -> dict[str, list[dict]]:
    manifest = json.loads((root / "dataset.json").read_text())
    return {split: list(wds.WebDataset([str(root / s) for s in shards], shardshuffle=False))
            for split, shards in manifest["splits"].items()}  # fmt: skip


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = random.Random(0)
    return [sample_scene(rng, compositional=i % 2 == 1) for i in range(600)]


def test_same_seed_same_bytes_whatever_the_workers(root: Path, tmp_path: Path) -> None:
    assert _files(_generate(tmp_path / "b", seed=0, num_workers=1)) == _files(root)


def test_other_seed_other_bytes(root: Path, tmp_path: Path) -> None:
    other = _files(_generate(tmp_path / "c", seed=1, num_workers=1))
    assert other.keys() == _files(root).keys()
    for shard in ("train/shard-000000.tar", "style_shift/shard-000000.tar"):
        assert other[shard] != _files(root)[shard]


def test_manifest(root: Path) -> None:
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["counts"] == SIZES
    assert manifest["splits"]["train"] == ["train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar"]
    assert all((root / s).is_file() for shards in manifest["splits"].values() for s in shards)
    assert manifest["tokenizer"] == "tokenizer.json" and (root / "tokenizer.json").is_file()
    assert {tuple(p) for p in manifest["held_out_combinations"]} == set(HELD_OUT)


def test_shards_round_trip(samples: dict[str, list[dict]]) -> None:
    for split, items in samples.items():
        assert len(items) == SIZES[split]
        assert len({s["__key__"] for s in items}) == SIZES[split]
        for sample in items:
            assert {"__key__", "jpg", "txt", "json"} <= sample.keys()
            record = json.loads(sample["json"])
            assert record["caption"] == sample["txt"].decode()
            assert record["image_size"] == [64, 64]
            assert Image.open(io.BytesIO(sample["jpg"])).convert("RGB").size == (64, 64)


def test_held_out_pairs_only_in_compositional_split(samples: dict[str, list[dict]]) -> None:
    for split, items in samples.items():
        for sample in items:
            objects = json.loads(sample["json"])["objects"]
            held = [(o["color"], o["shape"]) in HELD_OUT for o in objects]
            assert any(held) if split == "compositional" else not any(held)


def test_caption_names_every_object_and_true_relations(scenes: list[Scene]) -> None:
    for scene in scenes:
        text = caption(scene)
        assert OBJECT.findall(text) == [(o.size, o.color, o.shape) for o in scene.objects]
        for i, rel, j in clauses(scene):
            if rel is not None and j is not None:
                assert holds(scene.objects[i].box, rel, scene.objects[j].box)
        assert (f"the word {scene.word} is written" in text) == (scene.word is not None)
    assert any(rel for scene in scenes for _, rel, _ in clauses(scene))


def test_answers_agree_with_scene(scenes: list[Scene]) -> None:
    answers = {"spatial": set(), "existence": set()}
    for k, scene in enumerate(scenes):
        objs = scene.objects
        for qa in questions(scene, random.Random(k)):
            q, a, skill = qa["question"], qa["answer"], qa["skill"]
            if skill == "count":
                assert a == ("one", "two", "three", "four")[len(objs) - 1]
            elif skill == "color":
                assert [o.color for o in objs if q == f"What colour is the {o.shape}?"] == [a]
            elif skill == "shape":
                assert [o.shape for o in objs if q == f"What shape is the {o.color} object?"] == [a]
            elif skill == "existence":
                color, shape = q.rsplit(" ", 2)[-2:]
                assert (a == "yes") == any((o.color, o.shape) == (color, shape[:-1]) for o in objs)
                answers[skill].add(a)
            elif skill == "spatial":
                c1, s1, rel, c2, s2 = SPATIAL.fullmatch(q).groups()
                (first,) = [o for o in objs if (o.color, o.shape) == (c1, s1)]
                (second,) = [o for o in objs if (o.color, o.shape) == (c2, s2)]
                assert (a == "yes") == holds(first.box, rel, second.box)
                assert holds(first.box, rel, second.box) != holds(first.box, OPPOSITE[rel], second.box)
                answers[skill].add(a)
            else:
                assert (skill, q, a) == ("text", "What word is written?", scene.word)
    assert answers == {"spatial": {"yes", "no"}, "existence": {"yes", "no"}}


def test_hard_negatives_are_false_and_tagged(scenes: list[Scene]) -> None:
    kinds = set()
    for k, scene in enumerate(scenes):
        true = caption(scene)
        triples = sorted((o.size, o.color, o.shape) for o in scene.objects)
        for negative in hard_negatives(scene, random.Random(k)):
            kinds.add(negative["kind"])
            assert negative["caption"] != true
            named = OBJECT.findall(negative["caption"])
            if negative["kind"] == "relation":
                assert sorted(named) == triples
            else:
                assert sorted(named) != triples
                assert not {(c, s) for _, c, s in named} - {(o.color, o.shape) for o in scene.objects} & set(HELD_OUT)
    assert kinds == {"color", "shape", "size", "relation"}


def test_render_paints_each_object_in_its_colour(scenes: list[Scene]) -> None:
    for scene in scenes[:50]:
        image = render(scene)
        assert image.size == (64, 64) and image.mode == "RGB"
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            pixel = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            assert max(abs(p - c) for p, c in zip(pixel, COLORS[obj.color])) < 40


def test_relation_negative_skips_a_reversal_that_a_twin_makes_true() -> None:
    twin = [SceneObject("circle", "red", "small", box) for box in ((0, 0, 10, 10), (40, 0, 50, 10))]
    between = SceneObject("square", "blue", "small", (20, 0, 30, 10))
    scene = Scene(objects=[twin[0], between, twin[1]], word=None, word_box=None, image_size=64)
    assert caption(scene) == "a small red circle left of a small blue square. a small red circle."
    assert "relation" not in {n["kind"] for n in hard_negatives(scene, random.Random(0))}


def test_tokenizer_round_trip(root: Path, samples: dict[str, list[dict]]) -> None:
    tokenizer = load_tokenizer(root)
    assert load_tokenizer(root / "tokenizer.json").get_vocab() == tokenizer.get_vocab()
    special = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
               tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id]  # fmt: skip
    assert None not in special and len(set(special)) == 7
    for sample in samples["train"]:
        record = json.loads(sample["json"])
        texts = [record["caption"]] + [t for qa in record["qa"] for t in (qa["question"], qa["answer"])]
        for text in texts + [n["caption"] for n in record["hard_negatives"]]:
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids and not set(ids) & set(special)
            assert tokenizer.decode(ids) == text.lower()


def test_default_style_keeps_train_bytes(scenes: list[Scene]) -> None:
    """Golden losses depend on train's bytes: the default style draws exactly what was drawn before styles."""
    jpgs = [hashlib.sha256(make_sample(0, "train", i)["jpg"]).hexdigest()[:16] for i in range(3)]
    assert jpgs == ["b782d6c584b58e45", "65de931e478086de", "ed48cb4a40dce556"]
    assert all(render(s).tobytes() == render(s, DEFAULT_STYLE).tobytes() for s in scenes[:20])


def test_style_shift_shares_no_image_with_train(scenes: list[Scene]) -> None:
    images = {split: [make_sample(0, split, i)["jpg"] for i in range(200)] for split in ("train", STYLE_SHIFT)}
    pixels = {split: {Image.open(io.BytesIO(jpg)).tobytes() for jpg in jpgs} for split, jpgs in images.items()}
    assert not set(images["train"]) & set(images[STYLE_SHIFT]) and not pixels["train"] & pixels[STYLE_SHIFT]
    rng = random.Random(0)
    assert all(render(s).tobytes() != render(s, sample_style(rng)).tobytes() for s in scenes[:50])  # same scene


def test_jitter_keeps_the_nearest_colour_name() -> None:
    for name, rgb in COLORS.items():
        for hue, value in itertools.product([-1, -0.5, 0, 0.5, 1], repeat=2):
            assert nearest_color(jitter(rgb, hue * HUE_JITTER, 1 + value * VALUE_JITTER)) == name


def test_style_shift_labels_stay_true(samples: dict[str, list[dict]]) -> None:
    """Objects read as their colour name through blur, noise and JPEG, and sizes are other than train's."""
    sides = {split: {"small": set(), "large": set()} for split in ("train", STYLE_SHIFT)}
    for split in sides:
        for sample in samples[split]:
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            for obj in json.loads(sample["json"])["objects"]:
                x0, y0, x1, y1 = obj["box"]
                sides[split][obj["size"]].add(x1 - x0)
                if obj["size"] == "large":
                    assert nearest_color(image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))) == obj["color"]
    assert sides["train"] == {size: {round(FRACTIONS[size] * 64)} for size in FRACTIONS}
    for size, (low, high) in SHIFTED_SIZES.items():
        assert all(round(low * 64) <= side <= round(high * 64) for side in sides[STYLE_SHIFT][size])
        assert not sides[STYLE_SHIFT][size] & sides["train"][size]


def test_missing_default_split_is_added_as_if_generated_with_it(root: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    older = {split: n for split, n in SIZES.items() if split != STYLE_SHIFT}
    generate_benchmark("data/synthetic", older, seed=0, samples_per_shard=16, num_workers=0)
    monkeypatch.setattr(datamodule, "add_splits", lambda at: add_splits(at, SIZES, samples_per_shard=16))
    datamodule.ensure_default_benchmark("data/synthetic")
    assert "lacks the split(s) style_shift" in capsys.readouterr().out
    assert _files(tmp_path / "data/synthetic") == _files(root)  # shards and manifest
    generate_benchmark(tmp_path / "elsewhere", older, seed=0, samples_per_shard=16, num_workers=0)
    datamodule.ensure_default_benchmark(tmp_path / "elsewhere")  # not the default place: left as it is
    assert not (tmp_path / "elsewhere" / STYLE_SHIFT).exists()
