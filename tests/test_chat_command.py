"""``chat``: a generative recipe answers a prompt or a conversation about an image file; a contrastive one scores
labels; asking either for what it cannot do, or giving an unreadable image, fails in one line."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from test_export import save_checkpoint, tiny_recipe

from lightning_vlm.cli import load_model, main


@pytest.fixture(scope="module")
def trained(tiny_benchmark, tmp_path_factory) -> dict[str, list[str]]:
    """Per recipe (llava, clip), the chat arguments of a checkpoint and an image file."""
    folder = tmp_path_factory.mktemp("chat")
    Image.new("RGB", (96, 80), "red").save(folder / "red.png")
    args = {}
    for name in ("llava", "clip"):
        recipe = tiny_recipe(name, tiny_benchmark, folder)
        checkpoint = save_checkpoint(load_model(str(recipe)), folder / f"{name}.ckpt")
        image = str(folder / "red.png")
        args[name] = ["chat", "--config", str(recipe), "--checkpoint", str(checkpoint), "--image", image]
    return args


def test_contrastive_scores_labels_sorted(trained, capsys):
    assert main([*trained["clip"], "--labels", "a red circle, a blue square,two green stars"]) == 0
    lines = capsys.readouterr().out.splitlines()
    probabilities = [float(line.split()[0]) for line in lines]
    assert sorted(line.split(maxsplit=1)[1] for line in lines) == ["a blue square", "a red circle", "two green stars"]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1, abs=2e-3)


def test_generative_answers_a_prompt_and_a_conversation(trained, capsys, monkeypatch):
    assert main([*trained["llava"], "--prompt", "What colour is it?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\nHow many?\n\nnever asked\n"))
    assert main(trained["llava"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("clip", ["--prompt", "hi"], "--labels"),
        ("llava", ["--labels", "a,b"], "--prompt"),
        ("clip", ["--image", "/nonexistent.png"], "/nonexistent.png not found"),
    ],
)
def test_a_request_the_recipe_cannot_answer_fails_in_one_line(trained, capsys, name, extra, message):
    assert main([*trained[name], *extra]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
