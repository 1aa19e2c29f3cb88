"""Converters from real data to shards, shard inspection, and the ``data`` CLI, on a few tiny images."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from lightning_vlm.data.tools.cli import main
from lightning_vlm.data.tools.convert import convert_coco, convert_image_folder
from lightning_vlm.data.tools.inspect import inspect_shards

# file name -> (size, format); two captions for the jpg, one each for the others
IMAGES = {"a.jpg": ((32, 24), "JPEG"), "sub/b.png": ((16, 16), "PNG"), "c.jpeg": ((20, 10), "JPEG")}
ROWS = [
    {"image": "a.jpg", "caption": "a red square", "license": "cc-by"},
    {"image": "a.jpg", "caption": "a square that is red", "license": "cc-by"},
    {"image": "sub/b.png", "caption": "a blue circle", "license": "cc0"},
    {"image": "c.jpeg", "caption": "a green bar", "license": "cc0"},
    {"image": "broken.jpg", "caption": "never written", "license": "cc0"},
    {"image": "gone.png", "caption": "never written either", "license": "cc0"},
]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder of a few small jpg/png images, plus a truncated (corrupt) jpg; gone.png does not exist."""
    folder = tmp_path / "images"
    for name, (size, fmt) in IMAGES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 30, 30)).save(folder / name, fmt)
    (folder / "broken.jpg").write_bytes((folder / "a.jpg").read_bytes()[:40])
    return folder


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """Write rows to a CSV with the given header."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_back(out: Path, split: str = "train") -> list[dict]:
    """Decode every sample of a split with webdataset, in order."""
    manifest = json.loads((out / "dataset.json").read_text())
    urls = [str(out / name) for name in manifest["splits"][split]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def image_of(sample: dict) -> Image.Image:
    """The decoded image of a sample, whatever its format key."""
    return next(sample[k] for k in ("jpg", "png", "webp") if k in sample)


@pytest.mark.parametrize("table", ["csv", "jsonl"])
def test_folder_round_trip(tmp_path: Path, image_dir: Path, table: str) -> None:
    captions = (write_csv(tmp_path / "captions.csv", ROWS, ["image", "caption", "license"]) if table == "csv"
                else write_jsonl(tmp_path / "captions.jsonl", ROWS))
    report = convert_image_folder(image_dir, captions, tmp_path / "out", samples_per_shard=3)

    assert report.samples == 4  # one sample per caption: a.jpg twice
    assert report.shards == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert {s.path: s.reason.split(":")[0] for s in report.skipped} == {
        "broken.jpg": "not decodable", "gone.png": "missing"}
    assert report.skipped_samples == 2
    samples = read_back(tmp_path / "out")
    assert [s["txt"] for s in samples] == [r["caption"] for r in ROWS[:4]]
    for sample, row in zip(samples, ROWS):
        size, fmt = IMAGES[row["image"]]
        assert image_of(sample).size == size
        assert ("jpg" if fmt == "JPEG" else "png") in sample
        assert sample["json"] == {"caption": row["caption"], "source": row["image"], "license": row["license"]}


def test_image_bytes_are_kept_as_is(tmp_path: Path, image_dir: Path) -> None:
    captions = write_csv(tmp_path / "c.csv", ROWS[2:3], ["image", "caption", "license"])
    convert_image_folder(image_dir, captions, tmp_path / "out")
    sample = next(iter(wds.WebDataset(str(tmp_path / "out/train/shard-000000.tar"), shardshuffle=False)))
    assert sample["png"] == (image_dir / "sub/b.png").read_bytes()


def test_manifest_keeps_other_splits(tmp_path: Path, image_dir: Path) -> None:
    captions = write_csv(tmp_path / "c.csv", ROWS[:4], ["image", "caption", "license"])
    convert_image_folder(image_dir, captions, tmp_path / "out", split="train")
    convert_image_folder(image_dir, captions, tmp_path / "out", split="val", samples_per_shard=2)
    manifest = json.loads((tmp_path / "out/dataset.json").read_text())
    assert manifest["version"] == 1
    assert manifest["counts"] == {"train": 4, "val": 4}
    assert manifest["splits"]["val"] == ["val/shard-000000.tar", "val/shard-000001.tar"]
    assert manifest["source"]["val"]["format"] == "image_folder"


def test_other_column_names(tmp_path: Path, image_dir: Path) -> None:
    rows = [{"file_name": "a.jpg", "text": "a red square"}]
    report = convert_image_folder(image_dir, write_csv(tmp_path / "c.csv", rows, ["file_name", "text"]),
                                  tmp_path / "out")
    assert report.samples == 1
    assert read_back(tmp_path / "out")[0]["json"] == {"caption": "a red square", "source": "a.jpg"}


def test_unknown_caption_column_names_the_columns(tmp_path: Path, image_dir: Path) -> None:
    rows = [{"image": "a.jpg", "alt": "a red square"}]
    captions = write_csv(tmp_path / "c.csv", rows, ["image", "alt"])
    with pytest.raises(ValueError, match=r"'caption' or 'text'.*\['image', 'alt'\]"):
        convert_image_folder(image_dir, captions, tmp_path / "out")
    assert main(["convert", "folder", "--images", str(image_dir), "--captions", str(captions),
                 "--out", str(tmp_path / "out")]) == 1


def test_coco(tmp_path: Path, image_dir: Path) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "sub/b.png"},
                   {"id": 3, "file_name": "gone.png"}, {"id": 4, "file_name": "c.jpeg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a red square "},
                        {"id": 11, "image_id": 2, "caption": "a blue circle"},
                        {"id": 12, "image_id": 1, "caption": "a square that is red"},
                        {"id": 13, "image_id": 3, "caption": "lost"}],
    }
    annotations = tmp_path / "captions_train.json"
    annotations.write_text(json.dumps(coco))
    report = convert_coco(annotations, image_dir, tmp_path / "out")

    assert report.samples == 2
    assert sorted((s.path, s.reason) for s in report.skipped) == [("c.jpeg", "no caption"), ("gone.png", "missing")]
    first, second = read_back(tmp_path / "out")
    assert first["txt"] == "a red square"
    assert first["json"] == {"caption": "a red square", "captions": ["a red square", "a square that is red"],
                             "image_id": 1, "file_name": "a.jpg"}
    assert image_of(first).size == (32, 24) and image_of(second).size == (16, 16)


def test_inspect_counts_keys_and_sizes(tmp_path: Path, image_dir: Path) -> None:
    captions = write_csv(tmp_path / "c.csv", ROWS, ["image", "caption", "license"])
    convert_image_folder(image_dir, captions, tmp_path / "out", samples_per_shard=3)
    report = inspect_shards(tmp_path / "out", samples=2)

    assert "split train: 2 shards, 4 samples (manifest agrees)" in report
    assert "keys: jpg 3, json 4, png 1, txt 4" in report
    assert "32x24 (2)" in report and "16x16 (1)" in report and "20x10 (1)" in report
    assert report.count("  sample ") == 2 and "'a red square'" in report
    (tmp_path / "out/dataset.json").unlink()  # the tars alone give the same counts
    assert "split train: 2 shards, 4 samples" in inspect_shards(tmp_path / "out")
    single = inspect_shards(tmp_path / "out/train/shard-000001.tar")
    assert "split shard-000001.tar: 1 shards, 1 samples" in single
    pattern = inspect_shards(str(tmp_path / "out/train/shard-{000000..000001}.tar"))
    assert "2 shards, 4 samples" in pattern


def test_cli_convert_and_inspect(tmp_path: Path, image_dir: Path, capsys: pytest.CaptureFixture) -> None:
    captions = write_jsonl(tmp_path / "c.jsonl", ROWS)
    out = tmp_path / "out"
    assert main(["convert", "folder", "--images", str(image_dir), "--captions", str(captions),
                 "--out", str(out), "--split", "val"]) == 0
    assert "wrote 4 samples in 1 shards" in capsys.readouterr().out
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "red"}]}))
    assert main(["convert", "coco", "--annotations", str(coco), "--images", str(image_dir), "--out", str(out)]) == 0
    assert main(["inspect", str(out), "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    assert "split train: 1 shards, 1 samples" in printed and "split val: 1 shards, 4 samples" in printed


def test_cli_synth_calls_the_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def generate_benchmark(out: Path, **kwargs) -> None:
        calls.append(kwargs)
        Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
        with wds.TarWriter(str(out / "shard-000000.tar")) as sink:
            sink.write({"__key__": "0", "png": (tmp_path / "x.png").read_bytes(), "txt": "x"})

    monkeypatch.setitem(sys.modules, "lightning_vlm.data.synthetic",
                        types.SimpleNamespace(generate_benchmark=generate_benchmark))
    assert main(["synth", "--out", str(tmp_path), "--train", "5", "--val", "2", "--test", "2",
                 "--compositional", "1", "--seed", "3", "--image-size", "32", "--no-text", "--workers", "2"]) == 0
    assert calls == [{"sizes": {"train": 5, "val": 2, "test": 2, "compositional": 1, "style_shift": 1000}, "seed": 3,
                      "image_size": 32,
                      "with_text": False, "samples_per_shard": 1000, "num_workers": 2}]
