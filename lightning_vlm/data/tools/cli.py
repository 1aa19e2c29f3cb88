"""``python -m lightning_vlm data {synth,convert,inspect}``: make, convert and look at webdataset shards.

A thin argparse layer: each subcommand calls one importable function and prints its report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lightning_vlm.data.synthetic.generator import DEFAULT_SIZES
from lightning_vlm.data.tools.convert import convert_coco, convert_image_folder
from lightning_vlm.data.tools.inspect import inspect_shards
from lightning_vlm.errors import UsageError


def main(argv: list[str]) -> int:
    """Run one data subcommand; returns the exit code (1 with a one-line message on bad input)."""
    args = build_parser().parse_args(argv)
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


def run_inspect(args: argparse.Namespace) -> str:
    """Report on shards."""
    return inspect_shards(args.path, samples=args.samples)


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
    """``data convert {folder,coco}``: options shared by both converters, then each one's inputs."""
    convert = commands.add_parser("convert", help="convert real image-caption data to shards")
    sources = convert.add_subparsers(dest="source", required=True)
    folder = _subcommand(sources, "folder", "a folder of images + a CSV or JSONL of captions", run_convert_folder)
    folder.add_argument("--images", type=Path, required=True, help="folder the image paths are relative to")
    folder.add_argument("--captions", type=Path, required=True, help=".csv or .jsonl: one row per (image, caption)")
    folder.add_argument("--image-column", help="default: 'image' or 'file_name'")
    folder.add_argument("--caption-column", help="default: 'caption' or 'text'")
    coco = _subcommand(sources, "coco", "a COCO captions annotation file + its images", run_convert_coco)
    coco.add_argument("--annotations", type=Path, required=True, help="e.g. captions_train2017.json")
    coco.add_argument("--images", type=Path, required=True, help="folder of the file_name entries")
    for sub in (folder, coco):
        sub.add_argument("--out", type=Path, required=True, help="dataset root; shards go to OUT/SPLIT/")
        sub.add_argument("--split", default="train", help="split name (other splits in OUT are kept)")
        sub.add_argument("--samples-per-shard", type=int, default=1000)


def _subcommand(
    commands: argparse._SubParsersAction, name: str, summary: str, handler: Callable[[argparse.Namespace], str]
) -> argparse.ArgumentParser:
    """Add a subparser whose ``handler`` runs the command and returns the text to print."""
    sub = commands.add_parser(name, help=summary, description=summary)
    sub.set_defaults(handler=handler)
    return sub
