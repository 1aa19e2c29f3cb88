"""Running a comparison: check every entry, then train and score each cell not yet done (the ledger says which),
then write the report."""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from lightning_vlm.compare.cells import (
    blind_config,
    cell_config,
    cell_name,
    probe_cell,
    test_cell,
    train_cell,
    write_config,
)
from lightning_vlm.compare.config import TASK_OF_GROUP, Comparison, Entry, load_comparison
from lightning_vlm.compare.report import write_report

LEDGER_FIELDS = ["cell", "entry", "seed", "status", "checkpoint", "train_s", "test_s", "finished"]


class Ledger:
    """``ledger.csv``: one row per cell with its status ("done" or "failed: ..."), checkpoint and times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        rows = list(csv.DictReader(path.open())) if path.is_file() else []
        self.rows = {row["cell"]: row for row in rows}

    def done(self, cell: str) -> bool:
        return self.rows.get(cell, {}).get("status") == "done"

    def record(self, **row) -> None:
        self.rows[row["cell"]] = {key: row.get(key, "") for key in LEDGER_FIELDS}
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, LEDGER_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows.values())


def check_entries(comparison: Comparison, out: Path, entries: list[Entry]) -> dict[str, set[str]]:
    """The groups each entry answers; fails before any training when an entry cannot answer a yardstick group or
    lacks a checkpoint it starts from that no recipe makes (the cell's fit trains a `made_by` recipe first)."""
    from lightning_vlm.cli import load_model

    answers = {}
    for entry in entries:
        config = cell_config(comparison, entry, comparison.seeds[0], out)
        init_args = config["model"]["init_args"]
        for source in init_args.get("init_from") or []:
            path = Path(source if isinstance(source, str) else source.get("path") or source["init_args"]["path"])
            if not path.is_file() and not (isinstance(source, dict) and source.get("made_by")):
                raise FileNotFoundError(f"entry {entry.label!r} starts from {path}, which does not exist: train the "
                                        "recipe that writes it first, or override model.init_args.init_from")
        path = write_config(config, out / "checks" / entry.label)
        paradigm = load_model(str(path))
        answered = {group for evaluator in paradigm.evaluators() for group in evaluator.groups} | {"loss"}
        if hasattr(paradigm.model, "vision"):
            answered.add("probe")
        tasks = config["data"]["init_args"].get("eval_tasks") or config["data"]["init_args"].get("tasks", {})
        answered -= {group for group, task in TASK_OF_GROUP.items() if task not in tasks}
        missing = [group for group in comparison.yardstick if group not in answered]
        if missing:
            raise ValueError(f"entry {entry.label!r} ({entry.recipe}) cannot answer {missing}: its evaluators and "
                             f"eval tasks give {sorted(answered)}; drop the group or the entry")
        answers[entry.label] = answered
    return answers


def run_comparison(comparison: Comparison, out: Path) -> Path:
    """Every cell not yet done in the ledger, trained and scored; returns the report's ``results.md``."""
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.csv")
    to_run = [e for e in comparison.entries if not all(ledger.done(cell_name(e, s)) for s in comparison.seeds)]
    answers = check_entries(comparison, out, to_run)
    groups = set(comparison.yardstick + comparison.also)
    for entry in comparison.entries:
        for seed in comparison.seeds:
            name = cell_name(entry, seed)
            if ledger.done(name):
                print(f"[compare] {name}: done before, skipped")
                continue
            cell = out / "cells" / name
            config = cell_config(comparison, entry, seed, out)
            config_path = write_config(config, cell)
            row = {"cell": name, "entry": entry.label, "seed": seed}
            try:
                print(f"[compare] {name}: training ({comparison.samples} samples)", flush=True)
                started = time.perf_counter()
                train_cell(config_path, cell)
                trained = time.perf_counter()
                print(f"[compare] {name}: scoring", flush=True)
                test_cell(config_path, cell)
                if "probe" in groups:
                    probe_cell(config_path, cell, comparison.probe)
                if comparison.blind and answers[entry.label] & groups & {"vqa", "captioning"}:
                    test_cell(write_config(blind_config(config, cell), cell, "blind.yaml"), cell, "blind.log")
                ledger.record(**row, status="done", checkpoint=str(cell / "final.ckpt"),
                              train_s=f"{trained - started:.1f}", test_s=f"{time.perf_counter() - trained:.1f}",
                              finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            except RuntimeError as err:
                ledger.record(**row, status=f"failed: {err}")
                print(f"[compare] {name}: {err}", flush=True)
    return write_report(comparison, out, ledger.rows)


def compare_main(argv: list[str]) -> int:
    """``compare --config comparisons/NAME.yaml [--out DIR] [--budget.samples N] [--seeds K]``."""
    parser = argparse.ArgumentParser(prog="python -m lightning_vlm compare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a comparison YAML (comparisons/*.yaml)")
    parser.add_argument("--out", help="where the runs and the report go (default runs/compare/NAME)")
    parser.add_argument("--budget.samples", dest="samples", type=int, help="training samples per entry")
    parser.add_argument("--seeds", type=int, help="run seeds 0..K-1")
    args = parser.parse_args(argv)
    try:
        comparison = load_comparison(args.config, args.samples, args.seeds)
        out = Path(args.out or f"runs/compare/{comparison.name}")
        report = run_comparison(comparison, out)
    except (ValueError, FileNotFoundError) as err:
        print(f"compare: {err}")
        return 2
    print(f"[compare] report: {report}")
    print(report.read_text())
    failed = [name for name, row in Ledger(out / "ledger.csv").rows.items() if row["status"] != "done"]
    if failed:
        print(f"[compare] not done: {failed} (see their cells/*/fit.log); a rerun retries them")
    return 1 if failed else 0
