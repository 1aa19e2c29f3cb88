"""``python -m lightning_vlm data {synth,convert,rehearse,inspect,curate}``: make, convert, write, look at and filter
webdataset shards.

A thin argparse layer: each subcommand calls one importable function and prints its report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_vlm.data.synthetic.generator import DEFAULT_SIZES
from lightning_vlm.data.tools.convert import convert_coco, convert_image_folder
from lightning_vlm.data.tools.inspect import inspect_shards
from lightning_vlm.errors import InvalidSettingError, UsageError


def main(argv: list[str], load_run: Callable[[str], tuple[Any, Any]] | None = None) -> int:
    """Run one data subcommand; returns the exit code (1 with a one-line message on bad input). `load_run` builds a
    trained recipe's paradigm and DataModule (``lightning_vlm.cli.load_run``: the command line sits above the data
    layer, so it hands its loader down) for ``curate``'s scorer."""
    args = build_parser().parse_args(argv)
    args.load_run = load_run
    try:
        print(args.handler(args))
    except UsageError:
        raise  # lightning_vlm.cli.main prints its one line and exits with status 2
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``data`` and its subcommands; each subparser sets ``handler``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_vlm data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_synth(commands)
    _add_convert(commands)
    _add_rehearse(commands)
    _add_curate(commands)
    shown = _subcommand(commands, "inspect", "summarise shards: counts, keys, image sizes, samples", run_inspect)
    shown.add_argument("path", help="dataset root, a single .tar, or a brace pattern such as 'shard-{000..009}.tar'")
    shown.add_argument("--samples", type=int, default=3, help="example samples shown per split")
    return parser


def run_synth(args: argparse.Namespace) -> str:
    """Generate the synthetic benchmark (imported here: it is the heaviest data module)."""
    from lightning_vlm.data.synthetic import generate_benchmark

    sizes = {split: getattr(args, split) for split in DEFAULT_SIZES}
    noise = {"caption_noise": args.caption_noise} if args.caption_noise else {}  # none: the call of earlier versions
    generate_benchmark(args.out, sizes=sizes, seed=args.seed, image_size=args.image_size, with_text=not args.no_text,
                       samples_per_shard=args.samples_per_shard, num_workers=args.workers, **noise)
    return f"wrote the synthetic benchmark to {args.out}\n" + inspect_shards(args.out, samples=1)


def run_convert_folder(args: argparse.Namespace) -> str:
    """Convert an image folder + captions table."""
    return convert_image_folder(args.images, args.captions, args.out, samples_per_shard=args.samples_per_shard,
                                image_column=args.image_column, caption_column=args.caption_column,
                                split=args.split).summary()


def run_convert_coco(args: argparse.Namespace) -> str:
    """Convert a COCO captions split."""
    return convert_coco(args.annotations, args.images, args.out, samples_per_shard=args.samples_per_shard,
                        split=args.split).summary()


def run_convert_text(args: argparse.Namespace) -> str:
    """Convert text files to text-only shards."""
    from lightning_vlm.data.tools.text import convert_texts

    return convert_texts(args.files, args.out, args.split, args.samples_per_shard)


def run_rehearse(args: argparse.Namespace) -> str:
    """Write the LM's self-synthesized rehearsal texts (the LM, the slow part, loaded once the output is known)."""
    from lightning_vlm.data.rehearsal import synthesize
    from lightning_vlm.data.tools.text import write_texts
    from lightning_vlm.encoders.lm import LanguageModel

    if args.samples < 1:
        raise InvalidSettingError(f"--samples must be at least 1, got {args.samples}")
    lm = LanguageModel(name_or_path=args.model)
    rows = synthesize(lm, args.samples, args.seed, args.batch_size, args.max_new_tokens)
    source = {"format": "rehearsal", "model": args.model, "seed": args.seed, "samples": args.samples}
    count, shards = write_texts(rows, args.out, args.split, args.samples_per_shard, source)
    dropped = f" ({args.samples - count} empty generations left out)" if count < args.samples else ""
    return f"wrote {count} rehearsal texts by {args.model} in {len(shards)} shards to {args.out}{dropped}"


def run_inspect(args: argparse.Namespace) -> str:
    """Report on shards."""
    return inspect_shards(args.path, samples=args.samples)


def run_curate(args: argparse.Namespace) -> str:
    """Filter a split (the scorer, the slow part, loaded once the paths and rules are known to be right)."""
    from lightning_vlm.data.tools.clipscore import load_scorer
    from lightning_vlm.data.tools.curate import Rules, curate, input_splits

    if (args.scorer_config is None) != (args.scorer_checkpoint is None):
        raise InvalidSettingError("--scorer-config and --scorer-checkpoint go together")
    rules = Rules(args.min_side, args.max_side, args.max_aspect_ratio, args.min_chars, args.max_chars, args.min_words,
                  args.max_words, args.dedup_captions, args.near_duplicates, args.min_score, args.keep_fraction)
    input_splits(args.root, args.out, args.split)
    rules.check(args.scorer_config is not None)
    scorer = load_scorer(args.scorer_config, args.scorer_checkpoint, args.load_run) if args.scorer_config else None
    report = curate(args.root, args.out, rules, args.split, scorer, args.samples_per_shard, args.batch_size)
    return report.markdown(args.examples) + f"\nwrote {report.kept} samples and the report to {args.out}"


def _add_synth(commands: argparse._SubParsersAction) -> None:
    """``data synth``: options of the synthetic benchmark generator, a size per default split."""
    synth = _subcommand(commands, "synth", "generate the synthetic benchmark shards", run_synth)
    synth.add_argument("--out", type=Path, default=Path("data/synthetic"), help="dataset root to write")
    for split, default in DEFAULT_SIZES.items():
        synth.add_argument(f"--{split.replace('_', '-')}", type=int, default=default,
                           help=f"samples in the {split} split")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--no-text", action="store_true", help="no written words in the scenes")
    synth.add_argument("--samples-per-shard", type=int, default=1000)
    synth.add_argument("--workers", type=int, default=None,
                       help="worker processes (default: one per CPU; 0: this process)")
    synth.add_argument("--caption-noise", type=float, default=0.0, metavar="P",
                       help="share of train captions made wrong, each sample's json saying so in 'noisy' (default 0)")


def _add_convert(commands: argparse._SubParsersAction) -> None:
    """``data convert {folder,coco,text}``: each converter's inputs, then the options they share."""
    convert = commands.add_parser("convert", help="convert real image-caption data, or text, to shards")
    sources = convert.add_subparsers(dest="source", required=True)
    folder = _subcommand(sources, "folder", "a folder of images + a CSV or JSONL of captions", run_convert_folder)
    folder.add_argument("--images", type=Path, required=True, help="folder the image paths are relative to")
    folder.add_argument("--captions", type=Path, required=True, help=".csv or .jsonl: one row per (image, caption)")
    folder.add_argument("--image-column", help="default: 'image' or 'file_name'")
    folder.add_argument("--caption-column", help="default: 'caption' or 'text'")
    coco = _subcommand(sources, "coco", "a COCO captions annotation file + its images", run_convert_coco)
    coco.add_argument("--annotations", type=Path, required=True, help="e.g. captions_train2017.json")
    coco.add_argument("--images", type=Path, required=True, help="folder of the file_name entries")
    text = _subcommand(sources, "text", "text files to text-only shards (language rehearsal)", run_convert_text)
    text.add_argument("--files", type=Path, nargs="+", required=True, metavar="FILE",
                      help=".txt (paragraphs separated by blank lines) or .jsonl (rows with text, or question and "
                           "answer)")
    for sub in (folder, coco, text):
        sub.add_argument("--out", type=Path, required=True, help="dataset root; shards go to OUT/SPLIT/")
        sub.add_argument("--split", default="train", help="split name (other splits in OUT are kept)")
        sub.add_argument("--samples-per-shard", type=int, default=1000)


def _add_rehearse(commands: argparse._SubParsersAction) -> None:
    """``data rehearse``: the LM, where to write, and how many texts, sampled how."""
    rehearse = _subcommand(commands, "rehearse", "text-only shards the LM writes itself on fixed general prompts "
                           "(self-synthesized rehearsal)", run_rehearse)
    rehearse.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                          help="the LM as a recipe names it, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    rehearse.add_argument("--out", type=Path, required=True, help="dataset root; shards go to OUT/SPLIT/")
    rehearse.add_argument("--samples", type=int, default=400, metavar="N", help="texts written (prompts in turn)")
    rehearse.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    rehearse.add_argument("--split", default="train", help="split name (other splits in OUT are kept)")
    rehearse.add_argument("--batch-size", type=int, default=16, help="prompts generated at once")
    rehearse.add_argument("--max-new-tokens", type=int, default=60, metavar="N",
                          help="length limit of each text (the DataModule's max_length cuts longer ones)")
    rehearse.add_argument("--samples-per-shard", type=int, default=1000)


def _add_curate(commands: argparse._SubParsersAction) -> None:
    """``data curate``: the dataset, then the heuristic rules, then the CLIPScore scorer and its cut."""
    curate = _subcommand(commands, "curate", "write a filtered copy of a split and a report of what each rule removed",
                         run_curate)
    curate.add_argument("--in", dest="root", type=Path, required=True, help="dataset root to read")
    curate.add_argument("--out", type=Path, required=True, help="dataset root to write (not --in)")
    curate.add_argument("--split", default="train", help="split filtered; the others are copied as they are")
    curate.add_argument("--samples-per-shard", type=int, default=1000)
    curate.add_argument("--examples", type=int, default=5, help="removed samples shown per rule")
    bounds = curate.add_argument_group("heuristics (applied in this order)")
    bounds.add_argument("--min-side", type=int, metavar="N", help="drop images whose shorter side is under N pixels")
    bounds.add_argument("--max-side", type=int, metavar="N", help="drop images whose longer side is over N pixels")
    bounds.add_argument("--max-aspect-ratio", type=float, metavar="R",
                        help="drop images whose long / short side exceeds R")
    bounds.add_argument("--min-chars", type=int, metavar="N", help="drop captions shorter than N characters")
    bounds.add_argument("--max-chars", type=int, metavar="N", help="drop captions longer than N characters")
    bounds.add_argument("--min-words", type=int, metavar="N", help="drop captions of fewer than N words")
    bounds.add_argument("--max-words", type=int, metavar="N", help="drop captions of more than N words")
    bounds.add_argument("--dedup-captions", choices=["exact", "normalized"],
                        help="keep the first sample of each caption (normalized: up to case, punctuation, spacing)")
    bounds.add_argument("--near-duplicates", type=int, metavar="BITS",
                        help="keep the first of images whose 64-bit difference hashes differ in at most BITS bits")
    scoring = curate.add_argument_group("CLIPScore from a trained contrastive model (after the heuristics)")
    scoring.add_argument("--scorer-config", metavar="RECIPE", help="its recipe, e.g. recipes/clip.yaml")
    scoring.add_argument("--scorer-checkpoint", metavar="CKPT",
                         help="its trained weights, e.g. checkpoints/clip/last.ckpt")
    cut = scoring.add_mutually_exclusive_group()
    cut.add_argument("--min-score", type=float, metavar="T", help="drop pairs under this CLIPScore (2.5 x max(cos, 0))")
    cut.add_argument("--keep-fraction", type=float, metavar="F",
                     help="keep only this best-scoring share of the pairs scored")
    scoring.add_argument("--batch-size", type=int, default=256, help="pairs scored at once")


def _subcommand(
    commands: argparse._SubParsersAction, name: str, summary: str, handler: Callable[[argparse.Namespace], str]
) -> argparse.ArgumentParser:
    """Add a subparser whose ``handler`` runs the command and returns the text to print."""
    sub = commands.add_parser(name, help=summary, description=summary)
    sub.set_defaults(handler=handler)
    return sub
