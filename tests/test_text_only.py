"""Text-only data against forgetting: text shards (converted or self-synthesized), batched without images, labelled
on every token, trained through the LM alone; mixed with pairs without changing the pair batches."""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_vlm.adapters import MLP, AttentionPooler, Linear, PerceiverResampler, QFormer
from lightning_vlm.cli import main
from lightning_vlm.data.collate import Collator
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.data.rehearsal import load_prompts
from lightning_vlm.data.sources import ShardSource
from lightning_vlm.data.stream import ShardStream, StreamConfig, make_loader
from lightning_vlm.data.tasks import TaskFormatter
from lightning_vlm.data.tools.text import TextRow, write_texts
from lightning_vlm.data.transforms import ImageTransform
from lightning_vlm.encoders import RawPatches, VisionEncoder
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.errors import InvalidSettingError
from lightning_vlm.eval.retention import load_paragraphs, load_questions
from lightning_vlm.losses import BLIP2Loss
from lightning_vlm.losses.language import next_token_loss
from lightning_vlm.models.blip2 import BLIP2
from lightning_vlm.models.coca import CoCa
from lightning_vlm.models.cogvlm import CogVLM
from lightning_vlm.models.flamingo import Flamingo
from lightning_vlm.models.llama_adapter import LLaMAAdapter
from lightning_vlm.models.llava import LLaVA
from lightning_vlm.models.prefix_lm import PrefixLM
from lightning_vlm.paradigms.blip2 import BLIP2Paradigm
from lightning_vlm.paradigms.generative import ImageToText
from lightning_vlm.tokens import IGNORE_INDEX, IMAGE_TOKEN

RECIPES = Path(__file__).parents[1] / "recipes"
TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
LONG = " ".join(["a small red circle left of a big blue square."] * 12)  # past max_length: truncated
TEXTS = ["a red square is above a green circle.", "two blue triangles.", LONG,
         "what colour is the circle?\ngreen", "there is a yellow star."]


@pytest.fixture
def text_root(tmp_path) -> Path:
    root = tmp_path / "texts"
    write_texts([TextRow(text, {"n": n}) for n, text in enumerate(TEXTS * 8)], root, "train", 16, {"format": "test"})
    return root


def tiny_llava(tokenizer: str) -> LLaVA:
    torch.manual_seed(0)
    return LLaVA(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                 LanguageModel(tokenizer=tokenizer, config=TINY_LM), MLP())


def text_stream(lm: LanguageModel, sources: list[ShardSource], config: StreamConfig, max_length: int = 24,
                tasks: dict | None = None) -> ShardStream:
    """The stream a LLaVA recipe's DataModule builds: the LM's tokenizer, its image placeholder, a system prompt."""
    formatter = TaskFormatter(tasks or {"caption": 1.0, "vqa": 1.0}, "describe the image.",
                              system_prompt="answer briefly.")
    collate = Collator(lm.tokenizer, max_length, image_token=IMAGE_TOKEN)
    return ShardStream(sources, ImageTransform(64, (0.5,) * 3, (0.5,) * 3), formatter, collate, config)


def test_text_batches_carry_labels_on_every_token_and_no_image(tiny_benchmark, text_root):
    lm = LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM)
    tok = lm.tokenizer
    source = ShardSource(str(text_root), split="train", modality="text")
    batches = list(make_loader(text_stream(lm, [source], StreamConfig(batch_size=8)), 0, train=False))
    assert len(batches) == 5
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert batch["modality"] == "text" and not batch["pixel_values"].any()
        assert not (ids == lm.image_token_id).any()  # no placeholder: nothing would stand for an image
        assert (labels[:, 0] == IGNORE_INDEX).all()  # BOS, never a target after the shift
        assert torch.equal(labels[:, 1:], ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX))
        for row, meta in zip(ids, batch["meta"]):
            assert (meta["task"], meta["prompt"], meta["system"]) == ("text", "", "")
            expected = [tok.bos_token_id, *tok.encode(meta["caption"], add_special_tokens=False), tok.eos_token_id]
            if len(expected) > 24:  # truncated to max_length, the end token kept
                expected = expected[:23] + [tok.eos_token_id]
            assert row[: len(expected)].tolist() == expected
    assert any(meta["caption"] == LONG for batch in batches for meta in batch["meta"])
    assert max(batch["input_ids"].shape[1] for batch in batches) == 24


def test_a_text_batch_trains_the_lm_alone_on_its_own_next_token_loss(tiny_benchmark, text_root):
    model = tiny_llava(tiny_benchmark)
    paradigm = ImageToText(model)
    source = ShardSource(str(text_root), split="train", modality="text")
    batch = next(iter(make_loader(text_stream(model.language_model, [source], StreamConfig(batch_size=6)), 0,
                                  train=False)))

    def refuse(*args):
        raise AssertionError("a text-only batch must not reach the image encoder")

    model.vision.register_forward_pre_hook(refuse)
    loss = paradigm.training_step(batch, 0)
    reference = model.language_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           labels=batch["labels"]).loss  # transformers' own shift and mean
    assert torch.allclose(loss, reference, atol=1e-5)
    loss.backward()
    with_grad = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"language_model"}

    model.language_model.requires_grad_(False)  # a phase that freezes the LM: nothing to train on text
    assert paradigm.training_step(batch, 0) is None


FAMILIES = {
    "llava": lambda vit, lm: LLaVA(vit, lm, MLP()),
    "fuyu": lambda vit, lm: LLaVA(RawPatches(patch_size=16), lm, Linear()),
    "prefix_lm": lambda vit, lm: PrefixLM(vit, lm),
    "flamingo": lambda vit, lm: Flamingo(vit, lm, PerceiverResampler(num_latents=4, depth=1, num_heads=2),
                                         num_heads=2),
    "coca": lambda vit, lm: CoCa(vit, lm, embed_dim=16, caption_pooler=AttentionPooler(num_queries=4, num_heads=2),
                                 num_heads=2),
    "cogvlm": lambda vit, lm: CogVLM(RawPatches(patch_size=16), lm, Linear()),
    "llama_adapter": lambda vit, lm: LLaMAAdapter(vit, lm, num_prompts=4),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_predicts_text_alone_as_its_lm_does(family, tiny_benchmark, text_root):
    """What reads images by hooks (gates, experts, prompts) stays out of a text batch, even with its parts far from
    their initial values (gates at 0 and expert copies would otherwise hide a leak)."""
    torch.manual_seed(0)
    model = FAMILIES[family](VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                             LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("language_model."):
                param.add_(torch.randn_like(param))
    model.register_forward_pre_hook(lambda *args: pytest.fail("predict_language must not run the whole model"))
    for part in model.children():
        if part is not model.language_model:
            part.register_forward_pre_hook(lambda *args: pytest.fail("a text batch reached an image-side part"))
    source = ShardSource(str(text_root), split="train", modality="text")
    batch = next(iter(make_loader(text_stream(model.language_model, [source], StreamConfig(batch_size=5)), 0,
                                  train=False)))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    ours = next_token_loss(model.predict_language(ids, mask, labels))
    reference = model.language_model.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_fit_mixes_text_batches_that_never_encode_an_image(tiny_benchmark, text_root, tmp_path):
    model = tiny_llava(tiny_benchmark)
    paradigm = ImageToText(model, lr=1e-3, warmup_steps=1)
    steps: list[tuple[str, int]] = []  # (modality, image encoder calls during the step)
    calls = []
    model.vision.register_forward_hook(lambda *args: calls.append(1))

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            calls.clear()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            steps.append((batch["modality"], len(calls)))

    sources = [ShardSource(tiny_benchmark, split="train"),
               ShardSource(str(text_root), split="train", modality="text")]
    dm = ShardDataModule(root=tiny_benchmark, train=sources, tasks={"caption": 1, "vqa": 1}, batch_size=8,
                         samples_per_epoch=80, val_splits=[], test_splits=[])
    trainer = L.Trainer(max_steps=8, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Watch()], default_root_dir=tmp_path)
    trainer.fit(paradigm, dm)
    assert trainer.global_step == 8 and {modality for modality, _ in steps} == {"pair", "text"}
    assert all((n == 0) == (modality == "text") for modality, n in steps)
    assert torch.isfinite(trainer.callback_metrics["train/text_lm"])


def tiny_blip2(tokenizer: str, with_lm: bool) -> BLIP2Paradigm:
    torch.manual_seed(0)
    lm = LanguageModel(tokenizer=tokenizer, config=TINY_LM) if with_lm else None
    model = BLIP2(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  lambda width: QFormer(width, config=TINY_BERT, tokenizer=tokenizer, num_queries=4), lm,
                  embed_dim=16, projection=MLP())
    return BLIP2Paradigm(model, BLIP2Loss({"itc": 0.0, "itm": 0.0, "itg": 0.0, "lm": 1.0}) if with_lm else None)


def test_blip2_trains_a_text_batch_through_its_lm_alone(tiny_benchmark, text_root):
    paradigm = tiny_blip2(tiny_benchmark, with_lm=True)
    model = paradigm.model
    source = ShardSource(str(text_root), split="train", modality="text")
    batch = next(iter(make_loader(text_stream(model.language_model, [source], StreamConfig(batch_size=4)), 0,
                                  train=False)))
    model.vision.register_forward_pre_hook(lambda *args: pytest.fail("a text batch reached the image encoder"))
    paradigm.training_step(batch, 0).backward()
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None} == {"language_model"}


def test_a_model_without_a_language_model_refuses_text_sources_at_setup(tiny_benchmark, text_root, tmp_path):
    dm = ShardDataModule(root=tiny_benchmark, batch_size=4, val_splits=[], test_splits=[], tasks={"contrastive": 1},
                         train=[ShardSource(tiny_benchmark, split="train"),
                                ShardSource(str(text_root), split="train", modality="text")])
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(InvalidSettingError, match="text-only source.*language model"):
        trainer.fit(tiny_blip2(tiny_benchmark, with_lm=False), dm)


def test_a_mixture_gives_text_batches_at_its_weight_and_the_pair_batches_of_a_pair_only_run(tiny_benchmark,
                                                                                             text_root):
    lm = LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM)
    pairs = ShardSource(tiny_benchmark, split="train", weight=3.0)
    text = ShardSource(str(text_root), split="train", weight=1.0, modality="text", repeat=True)
    config = StreamConfig(batch_size=4, shuffle_buffer=16, seed=7)  # one pass over the pairs, as the recipes read
    mixed = list(make_loader(text_stream(lm, [pairs, text], config), 0, train=False))
    alone = list(make_loader(text_stream(lm, [pairs], config), 0, train=False))
    kinds = [batch["modality"] for batch in mixed]
    assert kinds.count("pair") == len(alone) == 64  # every pair batch, then the epoch ends
    assert 0.15 < kinds.count("text") / len(kinds) < 0.35  # a quarter, drawn; the 40 texts (10 batches) repeat
    mixed_pairs = [batch for batch in mixed if batch["modality"] == "pair"]
    for ours, theirs in zip(mixed_pairs, alone, strict=True):
        assert [m["key"] for m in ours["meta"]] == [m["key"] for m in theirs["meta"]]
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    again = [batch["modality"] for batch in make_loader(text_stream(lm, [pairs, text], config), 0, train=False)]
    assert again == kinds  # seeded
    once = replace(text, repeat=False)
    kinds_once = [batch["modality"] for batch in make_loader(text_stream(lm, [pairs, once], config), 0, train=False)]
    assert kinds_once.count("text") == 10 and kinds_once.count("pair") == 64  # without repeat the texts run out


@pytest.mark.parametrize("recipe, part", [("llava_smollm2", "text_rehearsal_llava"),
                                          ("blip2_smollm2", "text_rehearsal_blip2")])
def test_a_rehearsal_override_changes_only_the_mixture_and_the_checkpoint_folder(recipe, part, tiny_benchmark,
                                                                                 tmp_path):
    """Composed by LightningCLI's second --config (the real LM and Q-Former swapped for tiny ones to build fast)."""
    from lightning_vlm.callbacks import StagedFreezing
    from lightning_vlm.cli import VLMCLI

    from conftest import point_at

    config = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    parts = config["model"]["init_args"]["model"]["init_args"]
    parts["vision"] = yaml.safe_load((RECIPES / "parts" / "clip_cnn.yaml").read_text())
    parts["language_model"]["init_args"] = {"tokenizer": tiny_benchmark, "config": TINY_LM}
    if "qformer" in parts:
        parts["qformer"]["init_args"] = {"tokenizer": tiny_benchmark, "config": TINY_BERT, "num_queries": 4}
    override = yaml.safe_load((RECIPES / "parts" / f"{part}.yaml").read_text())
    for name, tree in (("recipe", config), ("override", override)):
        point_at(tree, tiny_benchmark)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    built = []
    for configs in (["recipe"], ["recipe", "override"]):
        args = [word for name in configs for word in ("--config", str(tmp_path / f"{name}.yaml"))]
        built.append(VLMCLI(args=[*args, "--model.init_args.init_from", "[]", "--trainer.logger", "false"], run=False))
    alone, rehearsed = (cli.config.as_dict() for cli in built)
    checkpoints = [cli.trainer.checkpoint_callback.dirpath for cli in built]
    assert checkpoints[1] == checkpoints[0] + "_text"  # the recipe's own checkpoint is left alone
    sources = rehearsed["data"]["init_args"].pop("train")
    assert alone["data"]["init_args"].pop("train") is None
    assert [(s["shards"], s["modality"], s["repeat"]) for s in sources] == [
        (tiny_benchmark, "pair", False), ("data/rehearsal", "text", True)]
    for config in (alone, rehearsed):
        config["trainer"]["callbacks"][0]["init_args"].pop("dirpath")
        config.pop("config")  # the files given
        config["trainer"].pop("plugins")  # an instance the command line adds to each run
    assert rehearsed == alone  # the staged plan, the retention probe and every other setting are the recipe's
    plans = [next(c for c in cli.trainer.callbacks if isinstance(c, StagedFreezing)) for cli in built]
    assert repr(plans[0].__dict__) == repr(plans[1].__dict__)


def test_convert_text_writes_what_it_read(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("First paragraph,\non two lines.\n\n\n\nSecond one.\n\nThird.\n")
    rows = [{"text": "a plain text row"}, {"question": "Why do cats purr?", "answer": "To communicate."}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    out = tmp_path / "out"
    assert main(["data", "convert", "text", "--files", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                 "--out", str(out), "--samples-per-shard", "2"]) == 0
    expected = ["First paragraph, on two lines.", "Second one.", "Third.", "a plain text row",
                "Why do cats purr?\nTo communicate."]
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["modality"] == {"train": "text"} and manifest["counts"] == {"train": 5}
    assert len(manifest["splits"]["train"]) == 3
    assert stored_texts(out) == expected
    source = ShardSource(str(out), split="train", modality="text")
    assert source.num_samples() == 5 and len(source.urls()) == 3
    with pytest.raises(InvalidSettingError, match="modality: text"):
        ShardSource(str(out), split="train").urls()  # read as pairs, every sample would be skipped


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "\n\n  \n", "holds no text"),
    ("rows.jsonl", '{"text": "fine"}\n{"question": "no answer?"}\n', 'line 2: a row needs'),
    ("broken.jsonl", '{"text": \n', "line 1: not JSON"),
    ("table.csv", "text\nhello\n", "must be .txt"),
])
def test_convert_text_refuses_bad_input_in_one_line(tmp_path, capsys, name, content, message):
    good = tmp_path / "good.txt"
    good.write_text("A paragraph.\n")
    if content is not None:
        (tmp_path / name).write_text(content)
    out = tmp_path / "out"
    assert main(["data", "convert", "text", "--files", str(good), str(tmp_path / name), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err and name in err
    assert not out.exists()  # every file is read before anything is written


def test_rehearsal_prompts_are_disjoint_from_the_retention_probe():
    prompts = load_prompts()
    kinds = [p.kind for p in prompts]
    assert kinds.count("topic") >= 20 and kinds.count("question") >= 20
    ours = [words(p.request) for p in prompts]
    theirs = [words(q.question) for q in load_questions()]
    theirs += [words(s) for paragraph in load_paragraphs() for s in re.split(r"(?<=[.!?])\s+", paragraph)]
    assert all(sentence and sentence not in prompt for sentence in theirs for prompt in ours)
    shared = {gram for prompt in ours for gram in ngrams(prompt)} & {gram for text in theirs for gram in ngrams(text)}
    assert not shared  # not even four words in a row in common


def test_rehearse_writes_n_rows_from_the_seed(tiny_benchmark, tmp_path, capsys):
    lm = LanguageModel(tokenizer=tiny_benchmark, config=TINY_LM)
    lm.model.save_pretrained(tmp_path / "lm")
    lm.tokenizer.save_pretrained(tmp_path / "lm")

    def rehearse(out: str, seed: int) -> list[str]:
        assert main(["data", "rehearse", "--model", str(tmp_path / "lm"), "--out", str(tmp_path / out), "--samples",
                     "7", "--seed", str(seed), "--batch-size", "3", "--max-new-tokens", "6"]) == 0
        return stored_texts(tmp_path / out)

    first, again, other = rehearse("a", 1), rehearse("b", 1), rehearse("c", 2)
    assert len(first) == 7 and first == again and first != other
    prompts = load_prompts()
    meta = stored_json(tmp_path / "a")
    assert [m.get("topic") or m.get("question") for m in meta] == [p.text for p in prompts[:7]]
    manifest = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert manifest["modality"] == {"train": "text"} and manifest["source"]["train"]["seed"] == 1
    assert main(["data", "rehearse", "--model", str(tmp_path / "lm"), "--out", str(tmp_path / "d"),
                 "--samples", "0"]) == 2


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    tokens = text.split()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def stored_members(root: Path, suffix: str) -> list[bytes]:
    """Every sample's member of that suffix, in shard and key order."""
    found = []
    for shard in sorted((root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            found += [tar.extractfile(m).read() for m in sorted(tar.getmembers(), key=lambda m: m.name)
                      if m.name.endswith(suffix)]
    return found


def stored_texts(root: Path) -> list[str]:
    return [data.decode() for data in stored_members(root, ".txt")]


def stored_json(root: Path) -> list[dict]:
    return [json.loads(data) for data in stored_members(root, ".json")]
