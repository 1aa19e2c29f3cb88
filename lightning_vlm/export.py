"""A trained recipe as a self-contained folder, and loading it back without the recipe, the data or a hub.

The folder holds the paradigm's weights (``model.safetensors``), its resolved configuration (``config.yaml``) with
every part that read outside files pointed inside the folder, each language model in transformers' own format
(``save_pretrained``, LoRA adapters merged: ``AutoModelForCausalLM.from_pretrained(DIR/language_model)`` loads it
alone) with its tokenizer, each other tokenizer the recipe named, and a model card (``README.md``) with what the
run recorded beside its checkpoint. The data section is kept as a record of what trained it; loading never reads
it. A part loaded by hub name other than a language model (a Q-Former initialised from a hub BERT) still names it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_vlm.callbacks.staged_freezing import StagedFreezing
from lightning_vlm.encoders.lm import LanguageModel
from lightning_vlm.errors import MissingInputError
from lightning_vlm.paradigms.base import VLMParadigm
from lightning_vlm.tokens import load_tokenizer

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.yaml", "README.md"
PATH_KEYS = ("name_or_path", "tokenizer")  # the init arguments that name files, relative to the folder once exported


def export(paradigm: VLMParadigm, recipe: dict[str, Any], out: str | Path, card: str) -> Path:
    """Write ``paradigm`` (built from ``recipe``, a LightningCLI configuration as one mapping, `read_recipe`) into
    ``out``, with ``card`` as its README.md; the configuration is written resolved (every default filled in)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parser = model_parser()
    resolved = yaml.safe_load(parser.dump(parser.parse_object({"model": recipe["model"]})))
    config = {**copy.deepcopy(recipe), "model": resolved["model"]}
    config["model"]["init_args"]["init_from"] = []  # the weights are in the folder
    state = {name: value.detach().clone().contiguous() for name, value in paradigm.state_dict().items()}
    for path, node in parts(config["model"]["init_args"]["model"]):
        part = submodule(paradigm.model, path)
        args = node.setdefault("init_args", {})
        if isinstance(part, LanguageModel):
            merged = merge_lora(copy.deepcopy(part.model))
            merged.save_pretrained(out / path)
            part.tokenizer.save_pretrained(out / path)
            prefix = f"model.{path}.model."
            state = {name: value for name, value in state.items() if not name.startswith(prefix)}
            state.update({prefix + name: value.clone() for name, value in merged.state_dict().items()})
            args.update(name_or_path=path, tokenizer=None, config=None, lora=None)
        elif isinstance(args.get("tokenizer"), str):
            load_tokenizer(args["tokenizer"]).save_pretrained(out / path / "tokenizer")
            args["tokenizer"] = f"{path}/tokenizer"
        if args.get("pretrained") is True:  # a timm backbone: its weights are in the folder, not to be downloaded
            args["pretrained"] = False
    save_file(state, out / WEIGHTS)
    (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (out / CARD).write_text(card)
    return out


def require_recipe(path: str) -> str:
    """``path`` when it is a file; a `MissingInputError` otherwise."""
    if not Path(path).is_file():
        raise MissingInputError(f"recipe {path} not found: give --config a recipe YAML (e.g. recipes/llava.yaml)")
    return path


def read_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """A fit's checkpoint, read on the CPU; a `MissingInputError` naming the fix when there is none."""
    if not Path(checkpoint).is_file():
        raise MissingInputError(
            f"checkpoint {checkpoint} not found: give --checkpoint the .ckpt a fit wrote "
            "(the recipe's ModelCheckpoint dirpath, e.g. checkpoints/llava/last.ckpt)"
        )
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def restore(paradigm: VLMParadigm, saved: dict[str, Any]) -> None:
    """Load a checkpoint into ``paradigm`` built from its recipe, in eval mode: the LoRA adapters that its
    staged-freezing plan injected (the checkpoint saves the plan and its phase) are injected first."""
    for name, state in (saved.get("callbacks") or {}).items():
        if name.startswith(StagedFreezing.__name__):
            StagedFreezing(state["plan"]).apply(paradigm, state["phase"])
    paradigm.load_state_dict(saved["state_dict"])
    paradigm.eval()


def model_parser() -> ArgumentParser:
    """The ``model`` part of a LightningCLI configuration (any paradigm, by class_path), parsed alone."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VLMParadigm, "model", fail_untyped=False, required=True)
    return parser


def load_pretrained(folder: str | Path) -> VLMParadigm:
    """The paradigm an `export` folder holds, in eval mode, ready for ``generate`` or ``encode_images`` /
    ``encode_texts``: built from its config.yaml (its files read from the folder) and its weights loaded strictly."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise MissingInputError(
            f"{folder} is not an exported model folder (it lacks {CONFIG} or {WEIGHTS}): "
            "write one with `python -m lightning_vlm export`"
        )
    model_config = yaml.safe_load((folder / CONFIG).read_text())["model"]
    for _, node in parts(model_config["init_args"]["model"]):
        args = node.get("init_args", {})
        for key in PATH_KEYS:
            if isinstance(args.get(key), str) and (folder / args[key]).exists():
                args[key] = str(folder / args[key])
    parser = model_parser()
    paradigm = parser.instantiate_classes(parser.parse_object({"model": model_config})).model
    paradigm.load_state_dict(load_file(folder / WEIGHTS))
    return paradigm.eval()


def parts(node: Any, path: str = "") -> list[tuple[str, dict]]:
    """(dotted path in the model, config node) of every part a model configuration builds (a ``class_path`` node),
    the model's own first: a part sits under its init argument's name, as the model stores it."""
    if not isinstance(node, dict) or "class_path" not in node:
        return []
    found = [(path, node)]
    for name, value in (node.get("init_args") or {}).items():
        found += parts(value, f"{path}.{name}" if path else name)
    return found


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The part at ``path``; None where a configuration's argument is not kept under its own name (an adapter
    that a model builds into its projector)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def merge_lora(model: nn.Module) -> nn.Module:
    """``model`` with its peft LoRA layers (injected in place, `LanguageModel.add_lora`) merged into their base
    layers and replaced by them, as peft's ``merge_and_unload`` does for a PeftModel; in place, returned."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)
    return model


def model_card(
    config: dict[str, Any], recipe: str, checkpoint: str | Path, saved: dict[str, Any], log_root: str | Path | None
) -> str:
    """The README of an exported folder: what the model is, how to load it, and the run's metrics, data and
    budget as recorded beside the ``saved`` checkpoint (the run's budget.json and TensorBoard scalars under
    ``log_root``, the checkpoint's monitored score), "not recorded" where nothing was."""
    step = saved.get("global_step")
    run = run_dir(log_root, step)
    metrics = {**scalars(run), **checkpoint_scores(saved)}
    budget = json.loads((run / "budget.json").read_text()) if run is not None else None
    data = config.get("data") or {}
    paradigm, model = config["model"]["class_path"], config["model"]["init_args"]["model"]["class_path"]
    lines = [
        f"# {model.rsplit('.', 1)[-1]} ({paradigm.rsplit('.', 1)[-1]})",
        "",
        f"Exported by `python -m lightning_vlm export` from recipe `{recipe}`, checkpoint `{checkpoint}` "
        f"(step {step}, epoch {saved.get('epoch')}).",
        "",
        "```python",
        "import lightning_vlm",
        'model = lightning_vlm.load_pretrained("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "## Metrics",
        "",
        *table(metrics),
        "",
        "## Data",
        "",
        f"`{data.get('class_path', 'not recorded')}`",
        "",
        "```yaml",
        yaml.safe_dump(data.get("init_args") or {}, sort_keys=False).rstrip(),
        "```",
        "",
        "## Budget",
        "",
        *table(budget),
        "",
    ]
    return "\n".join(lines)


def run_dir(log_root: str | Path | None, step: int | None) -> Path | None:
    """The newest log directory under ``log_root`` whose budget.json (callbacks/budget.py) ends at ``step``."""
    if log_root is None or not Path(log_root).is_dir():
        return None
    budgets = [path for path in Path(log_root).rglob("budget.json") if json.loads(path.read_text())["steps"] == step]
    return max(budgets, key=lambda path: path.stat().st_mtime).parent if budgets else None


def scalars(run: Path | None) -> dict[str, float]:
    """The last value of every evaluation scalar (not train/, budget/ or lr-) the run logged to TensorBoard."""
    if run is None:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return {
        tag: events.Scalars(tag)[-1].value
        for tag in events.Tags()["scalars"]
        if not tag.startswith(("train/", "budget/", "lr-", "epoch"))
    }


def checkpoint_scores(saved: dict[str, Any]) -> dict[str, float]:
    """The score a ModelCheckpoint monitored, as the checkpoint holds it."""
    scores = {}
    for state in (saved.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_score") is not None:
            scores[f"{state['monitor']} (best, checkpointing)"] = float(state["best_model_score"])
    return scores


def table(values: dict[str, Any] | None) -> list[str]:
    """A markdown table of name and value, or "not recorded"."""
    if not values:
        return ["not recorded"]
    return [
        "| name | value |",
        "| --- | --- |",
        *(
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in values.items()
        ),
    ]
