"""``data curate`` and the benchmark's caption noise: each rule removes exactly its samples from a hand-made shard set,
the report's counts and noise precision/recall are exact, CLIPScore follows the paper's formula and ranks a true
caption above a swapped one, noise marks exactly round(p x n) train samples from the seed, bad input fails in one
line."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from test_export import save_checkpoint, tiny_recipe

from lightning_vlm.cli import load_model, main
from lightning_vlm.data.reading import RawSample
from lightning_vlm.data.synthetic import generate_benchmark
from lightning_vlm.data.synthetic.noise import OTHER_IMAGE, noisy_indices
from lightning_vlm.data.synthetic.tokenizer import train_tokenizer
from lightning_vlm.data.tools.clipscore import CLIPSCORE_WEIGHT, PairScorer, clip_scores, spelt_out_share
from lightning_vlm.data.tools.curate import Rules, curate, dhash
from lightning_vlm.data.transforms import ImageTransform
from lightning_vlm.tokens import load_tokenizer


def noise_image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A random RGB image: distinct seeds give difference hashes far apart."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# key -> (image, caption, noisy: None for no json); the comment names the rule that removes it when every rule is on
HAND_MADE = {
    "k0": (noise_image(0), "a red square", False),  # kept
    "k1": (noise_image(1, (8, 8)), "a tiny image", True),  # image_side (--min-side 16)
    "k2": (noise_image(2, (64, 16)), "a wide image", False),  # aspect_ratio (--max-aspect-ratio 3), max_side (60)
    "k3": (noise_image(3), "hi", False),  # caption_chars (--min-chars 5)
    "k4": (noise_image(4), "one two three four five six seven eight nine ten eleven", False),  # caption_words (10)
    "k5": (noise_image(5), "A red  square!", True),  # duplicate_caption of k0 (normalized only)
    "k6": (noise_image(0).resize((48, 48)), "a blue circle", True),  # near_duplicate_image of k0
    "k7": (noise_image(7), "a green star", True),  # kept
    "k8": (None, "broken image", False),  # unreadable
    "k9": (noise_image(9), "a red square", False),  # duplicate_caption of k0 (exact and normalized)
}
EVERY_RULE = Rules(min_side=16, max_aspect=3, min_chars=5, max_words=10, dedup_captions="normalized",
                   near_duplicates=4)


def write_shards(root: Path, samples: dict, per_shard: int = 4, manifest: bool = True, split: str = "train") -> Path:
    """The samples as shards of `split` (a truncated PNG where the image is None, no json where noisy is None),
    with or without a manifest."""
    folder = root / split if manifest else root
    folder.mkdir(parents=True, exist_ok=True)
    keys, shards = list(samples), []
    for start in range(0, len(keys), per_shard):
        shards.append(folder / f"shard-{start // per_shard:06d}.tar")
        with wds.TarWriter(str(shards[-1])) as sink:
            for key in keys[start : start + per_shard]:
                image, caption, noisy = samples[key]
                data = png(image) if image is not None else png(noise_image(99))[:40]
                marked = {} if noisy is None else {"json": json.dumps({"noisy": noisy}).encode()}
                sink.write({"__key__": key, "png": data, "txt": caption.encode(), **marked})
    if manifest:
        names = [shard.relative_to(root).as_posix() for shard in shards]
        (root / "dataset.json").write_text(json.dumps({"version": 1, "splits": {split: names},
                                                       "counts": {split: len(keys)}}))  # fmt: skip
    return root


def read_split(root: Path, split: str = "train") -> list[dict]:
    manifest = json.loads((root / "dataset.json").read_text())
    return list(wds.WebDataset([str(root / s) for s in manifest["splits"][split]], shardshuffle=False))


@pytest.fixture
def hand_made(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "in", HAND_MADE)


@pytest.mark.parametrize(
    ("rules", "removed"),
    [
        (Rules(min_side=16), {"image_side": ["k1"]}),
        (Rules(max_side=60), {"image_side": ["k2"]}),
        (Rules(max_aspect=3), {"aspect_ratio": ["k2"]}),
        (Rules(min_chars=5), {"caption_chars": ["k3"]}),
        (Rules(max_chars=40), {"caption_chars": ["k4"]}),
        (Rules(min_words=3), {"caption_words": ["k3"]}),
        (Rules(max_words=10), {"caption_words": ["k4"]}),
        (Rules(dedup_captions="exact"), {"duplicate_caption": ["k9"]}),
        (Rules(dedup_captions="normalized"), {"duplicate_caption": ["k5", "k9"]}),
        (Rules(near_duplicates=4), {"near_duplicate_image": ["k6"]}),
        (EVERY_RULE, {"image_side": ["k1"], "aspect_ratio": ["k2"], "caption_chars": ["k3"], "caption_words": ["k4"],
                      "duplicate_caption": ["k5", "k9"], "near_duplicate_image": ["k6"]}),
    ],
)
def test_each_rule_removes_exactly_its_samples(hand_made: Path, tmp_path: Path, rules: Rules, removed: dict) -> None:
    report = curate(hand_made, tmp_path / "out", rules, samples_per_shard=3)
    got = {rule: [r.key for r in rs] for rule, rs in report.removed.items() if rs}
    assert got == {"unreadable": ["k8"], **removed}
    gone = {"k8", *(key for keys in removed.values() for key in keys)}
    kept = read_split(tmp_path / "out")
    assert [s["__key__"] for s in kept] == [k for k in HAND_MADE if k not in gone]
    original = {s["__key__"]: s for s in read_split(hand_made)}
    assert all(s[ext] == original[s["__key__"]][ext] for s in kept for ext in ("png", "txt", "json"))
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert manifest["counts"]["train"] == len(kept) == report.kept
    assert len(manifest["splits"]["train"]) == -(-len(kept) // 3)


def test_duplicates_point_at_the_sample_kept(hand_made: Path, tmp_path: Path) -> None:
    report = curate(hand_made, tmp_path / "out", EVERY_RULE)
    twins = {r.key: r.of for rs in report.removed.values() for r in rs if r.of}
    assert twins == {"k5": "k0", "k9": "k0", "k6": "k0"}
    assert dhash(noise_image(0)) != dhash(noise_image(1))


def test_report_counts_and_noise_precision_recall_are_exact(hand_made: Path, tmp_path: Path) -> None:
    curate(hand_made, tmp_path / "out", EVERY_RULE)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["read"], report["kept"]) == (10, 2)
    assert report["removed_counts"] == {"unreadable": 1, "image_side": 1, "aspect_ratio": 1, "caption_chars": 1,
                                        "caption_words": 1, "duplicate_caption": 2, "near_duplicate_image": 1,
                                        "clip_score": 0}  # fmt: skip
    noise = report["noise"]  # noisy: k1, k5, k6 removed; k7 kept
    assert (noise["marked_noisy"], noise["removed"], noise["noisy"]) == (4, 8, 3)
    assert noise["precision"] == 3 / 8 and noise["recall"] == 3 / 4 and noise["noisy_share_after"] == 1 / 2
    assert noise["rules"]["duplicate_caption"] == {"removed": 2, "noisy": 1, "precision": 0.5, "recall": 0.25}
    assert report["removed"]["duplicate_caption"] == [
        {"key": "k5", "caption": "A red  square!", "noisy": True, "of": "k0"},
        {"key": "k9", "caption": "a red square", "noisy": False, "of": "k0"},
    ]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| duplicate_caption | 2 | 1 | 0.500 | 0.250 |" in markdown
    assert '- `k5` [noisy]: "A red  square!" (duplicates k0)' in markdown


def test_without_the_marking_the_report_has_no_noise(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "in", {"a": (noise_image(0), "a cat", None), "b": (noise_image(1), "a cat", None)})
    report = curate(root, tmp_path / "out", Rules(dedup_captions="exact"))
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report.noise() is None and saved["noise"] is None
    assert saved["removed"]["duplicate_caption"] == [{"key": "b", "caption": "a cat", "of": "a"}]
    assert "Noisy pairs" not in (tmp_path / "out" / "report.md").read_text()


def test_other_splits_tokenizer_and_manifest_fields_are_copied(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "in", dict(list(HAND_MADE.items())[:3]))
    write_shards(tmp_path / "val_only", {"v": (noise_image(11), "a val sample", False)}, split="val")
    (root / "val").mkdir()
    (tmp_path / "val_only" / "val" / "shard-000000.tar").rename(root / "val" / "shard-000000.tar")
    (root / "tokenizer.json").write_text("{}")
    manifest = json.loads((root / "dataset.json").read_text())
    manifest.update(tokenizer="tokenizer.json", seed=5, splits={**manifest["splits"], "val": ["val/shard-000000.tar"]})
    (root / "dataset.json").write_text(json.dumps(manifest))
    curate(root, tmp_path / "out", Rules(min_side=16))
    out = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert out["seed"] == 5 and out["splits"]["val"] == ["val/shard-000000.tar"]
    assert (tmp_path / "out/val/shard-000000.tar").read_bytes() == (root / "val/shard-000000.tar").read_bytes()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert out["curated"]["rules"] == {"min_side": 16} and out["counts"]["train"] == 2


def test_shards_without_a_manifest_are_read_as_the_train_split(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "in", HAND_MADE, manifest=False)  # as img2dataset writes them
    report = curate(root, tmp_path / "out", Rules(max_words=10))
    assert report.read == 10 and [r.key for r in report.removed["caption_words"]] == ["k4"]
    assert len(read_split(tmp_path / "out")) == 8


# ---- CLIPScore --------------------------------------------------------------------------------------------------
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourModel:
    """A scorer built by hand, not trained: an image embeds as its mean normalised colour, a caption as +1 on the
    channel its colour word names and -1 on the others, so a caption naming the image's colour has the highest
    cosine and another colour's a negative one."""

    def __init__(self, tokenizer) -> None:
        self.channels = {tokenizer.convert_tokens_to_ids(word): i for i, word in enumerate(COLOURS)}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = torch.full((len(input_ids), 3), -1.0)
        for row, ids in enumerate(input_ids.tolist()):
            for token in ids:
                if token in self.channels:
                    rows[row, self.channels[token]] = 1.0
        return rows


@pytest.fixture
def colour_scorer(tmp_path: Path) -> PairScorer:
    train_tokenizer([f"a {c} square." for c in COLOURS], tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer.json"))
    return PairScorer(ColourModel(tokenizer), tokenizer, ImageTransform(16))


def test_clip_score_is_the_papers_formula(colour_scorer: PairScorer) -> None:
    images = [Image.new("RGB", (16, 16), COLOURS[c]) for c in ("red", "red", "blue")]
    captions = ["a red square.", "a green square.", "a blue square."]
    scores = clip_scores(colour_scorer, images, captions)
    transform = colour_scorer.transform
    pixels = torch.stack([transform(RawSample("", i, "", {}), random.Random(0))[0] for i in images]).mean(dim=(2, 3))
    texts = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    cos = torch.nn.functional.cosine_similarity(pixels, texts)
    assert cos[1] < 0 and scores[1] == 0
    torch.testing.assert_close(scores, CLIPSCORE_WEIGHT * cos.clamp(min=0))


def test_clip_score_ranks_the_true_caption_above_a_swapped_one(colour_scorer: PairScorer) -> None:
    red = Image.new("RGB", (16, 16), COLOURS["red"])
    true, swapped = clip_scores(colour_scorer, [red, red], ["a red square.", "a blue square."]).tolist()
    assert true > swapped


@pytest.mark.parametrize("cut", [{"keep_fraction": 0.5}, {"min_score": 1.0}])
def test_clip_score_cut_removes_the_mismatched_pairs(tmp_path: Path, colour_scorer: PairScorer, cut: dict) -> None:
    pairs = {"r": ("red", "red", False), "g": ("green", "blue", True), "b": ("blue", "blue", False),
             "x": ("red", "green", True)}  # key -> (image colour, caption colour, noisy)
    samples = {k: (Image.new("RGB", (16, 16), COLOURS[i]), f"a {c} square.", n) for k, (i, c, n) in pairs.items()}
    report = curate(write_shards(tmp_path / "in", samples), tmp_path / "out", Rules(**cut), scorer=colour_scorer,
                    batch_size=3)
    assert sorted(r.key for r in report.removed["clip_score"]) == ["g", "x"]
    assert report.noise()["precision"] == 1.0 and report.noise()["recall"] == 1.0
    assert [s["__key__"] for s in read_split(tmp_path / "out")] == ["r", "b"]


def test_spelt_out_share_tells_known_words_from_unknown_ones(colour_scorer: PairScorer) -> None:
    assert spelt_out_share(colour_scorer.tokenizer, ["a red square.", "a blue square"]) == 0.0
    assert spelt_out_share(colour_scorer.tokenizer, ["a zebra grazing", "red"]) == 2 / 3


# ---- caption noise in the generator -----------------------------------------------------------------------------
def _generate(root: Path, noise: float, seed: int = 0, train: int = 30) -> list[dict]:
    generate_benchmark(root, {"train": train, "val": 4}, seed=seed, samples_per_shard=8, num_workers=0,
                       caption_noise=noise)
    return read_split(root)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _generate(tmp_path_factory.mktemp("clean"), 0.0)


@pytest.mark.parametrize(("size", "share"), [(30, 0.3), (25, 0.1), (7, 0.5), (10, 1.0), (10, 0.0)])
def test_noise_picks_round_p_n_samples(size: int, share: float) -> None:
    assert len(noisy_indices(0, size, share)) == round(share * size)
    assert noisy_indices(0, size, share) <= set(range(size))


def test_noise_marks_exactly_the_noisy_train_samples(tmp_path: Path, clean: list[dict]) -> None:
    noisy = _generate(tmp_path / "n", 0.3)
    records = [json.loads(s["json"]) for s in noisy]
    marked = {i for i, r in enumerate(records) if r["noisy"]}
    assert marked == noisy_indices(0, 30, 0.3) and len(marked) == 9
    true_captions = [s["txt"].decode() for s in clean]
    for i, (sample, record, before) in enumerate(zip(noisy, records, clean)):
        assert sample["jpg"] == before["jpg"]
        if i not in marked:
            assert sample["txt"] == before["txt"] and record == {**json.loads(before["json"]), "noisy": False}
            continue
        text = sample["txt"].decode()
        assert text != record["clean_caption"] == true_captions[i] and record["caption"] == text
        if record["noise_kind"] == OTHER_IMAGE:
            assert text in true_captions[:i] + true_captions[i + 1 :]
        else:
            assert {"caption": text, "kind": record["noise_kind"]} in record["hard_negatives"]
    manifest = json.loads((tmp_path / "n" / "dataset.json").read_text())
    assert manifest["caption_noise"] == {"split": "train", "share": 0.3, "noisy": 9}
    assert all("noisy" not in json.loads(s["json"]) for s in read_split(tmp_path / "n", "val"))


def test_noise_is_a_function_of_the_seed(tmp_path: Path) -> None:
    first, again = _generate(tmp_path / "a", 0.3), _generate(tmp_path / "b", 0.3)
    assert [(s["txt"], s["json"]) for s in first] == [(s["txt"], s["json"]) for s in again]
    assert noisy_indices(1, 30, 0.3) != noisy_indices(0, 30, 0.3)
    assert noisy_indices(0, 30, 0.1) < noisy_indices(0, 30, 0.3)  # a larger share adds to a smaller one's


def test_no_noise_marks_nothing(clean: list[dict]) -> None:
    assert all("noisy" not in json.loads(s["json"]) for s in clean)


def test_synth_command_passes_the_noise(tmp_path: Path) -> None:
    assert main(["data", "synth", "--out", str(tmp_path), "--train", "10", "--val", "2", "--test", "0",
                 "--compositional", "0", "--style-shift", "0", "--caption-noise", "0.2", "--workers", "0"]) == 0
    assert sum(json.loads(s["json"])["noisy"] for s in read_split(tmp_path)) == 2


def test_synth_refuses_a_noise_share_outside_0_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--caption-noise", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --caption-noise must be a share in [0, 1], got 1.5"
    assert not (tmp_path / "x").exists()


# ---- the command line and its one-line mistakes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Scorer options per case: a tiny CLIP's recipe and checkpoint, the same checkpoint under a recipe reading
    another tokenizer, and a generative recipe; plus a benchmark to curate."""
    folder = tmp_path_factory.mktemp("scorers")
    generate_benchmark(folder / "bench", {"train": 12, "val": 2}, seed=0, num_workers=0)
    (folder / "other").mkdir()
    train_tokenizer(["a zebra grazing on the savanna"], folder / "other" / "tokenizer.json")
    (folder / "llava").mkdir()
    clip = tiny_recipe("clip", str(folder / "bench"), folder)
    checkpoint = save_checkpoint(load_model(str(clip)), folder / "clip.ckpt")
    other = tiny_recipe("clip", str(folder / "other"), folder / "other")
    llava = tiny_recipe("llava", str(folder / "bench"), folder / "llava")
    as_options = lambda recipe, ckpt: ["--scorer-config", str(recipe), "--scorer-checkpoint", str(ckpt)]  # noqa: E731
    return {"bench": [str(folder / "bench")], "clip": as_options(clip, checkpoint),
            "other_tokenizer": as_options(other, checkpoint), "llava": as_options(llava, checkpoint)}


def test_command_curates_with_a_recipes_scorer(scorers: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["data", "curate", "--in", *scorers["bench"], "--out", str(out), *scorers["clip"],
                 "--min-score", "0"]) == 0
    assert f"wrote 12 samples and the report to {out}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 12 and report["kept_clip_scores"]["max"] <= CLIPSCORE_WEIGHT
    assert json.loads((out / "dataset.json").read_text())["splits"]["val"] == ["val/shard-000000.tar"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no dataset", "has no dataset.json and no .tar shards"),
        ("out is in", "is the input dataset"),
        ("no split", "split 'nope' is not in"),
        ("score without scorer", "go with a scorer"),
        ("other tokenizer", "is not the one the checkpoint was trained with"),
        ("unknown words", "tokenizer does not match these captions"),
        ("cannot embed", "does not embed images and texts"),
    ],
)
def test_bad_input_fails_in_one_line(scorers: dict, tmp_path: Path, capsys: pytest.CaptureFixture, case: str,
                                     message: str) -> None:
    bench, out = scorers["bench"], ["--out", str(tmp_path / "out")]
    unknown = write_shards(tmp_path / "zoo", {"z": (noise_image(0), "zebras grazing on the savanna", False)})
    (tmp_path / "empty").mkdir()
    args = {"no dataset": ["--in", str(tmp_path / "empty"), *out],
            "out is in": ["--in", *bench, "--out", *bench],
            "no split": ["--in", *bench, *out, "--split", "nope"],
            "score without scorer": ["--in", *bench, *out, "--keep-fraction", "0.5"],
            "other tokenizer": ["--in", *bench, *out, *scorers["other_tokenizer"], "--min-score", "0.1"],
            "unknown words": ["--in", str(unknown), *out, *scorers["clip"], "--min-score", "0.1"],
            "cannot embed": ["--in", *bench, *out, *scorers["llava"], "--min-score", "0.1"]}[case]  # fmt: skip
    assert main(["data", "curate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
