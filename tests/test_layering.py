"""DESIGN's layer order holds: imports only point down (tokens/distributed -> encoders -> adapters -> models ->
losses -> data -> paradigms, callbacks, eval -> chat, export, soup -> cli -> compare, __main__, __init__; the package's
own __init__ sits on top, as it exports export's loader, imported on first use), the parts (encoders, adapters,
models, losses) import neither lightning nor the data pipeline, and no two subpackages import each other, even
through others. Read from the source with ast, every import counted (a function's lazy one too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lightning_vlm"
LAYERS = [
    {"tokens", "distributed", "pretrained", "allocator", "errors"},
    {"encoders"},
    {"adapters"},
    {"models"},
    {"losses"},
    {"data"},
    {"paradigms", "callbacks", "eval"},
    {"chat", "export", "soup"},
    {"cli"},
    {"compare", "__main__", "__init__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
PARTS = {"encoders", "adapters", "models", "losses"}


def unit_of(path: Path) -> str:
    """The layer unit of a module: its subpackage, or the module's own name at package level."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    """Every lightning_vlm unit and outside top-level package the module imports."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "lightning_vlm" else [f"lightning_vlm.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            units.add(parts[1] if parts[0] == "lightning_vlm" and len(parts) > 1 else f"<{parts[0]}>")
    return units


def edges() -> dict[str, set[str]]:
    """unit -> the other lightning_vlm units it imports (outside packages as <name>)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = unit_of(path)
        graph.setdefault(unit, set()).update(imported_units(path) - {unit})
    return graph


def test_every_unit_has_a_layer():
    assert set(edges()) - set(RANK) == set()


def test_imports_only_point_down():
    upward = sorted((unit, to) for unit, targets in edges().items() for to in targets
                    if to in RANK and RANK[to] > RANK[unit])
    assert upward == []


@pytest.mark.parametrize("part", sorted(PARTS))
def test_parts_import_neither_lightning_nor_the_data_pipeline(part):
    assert edges()[part] & {"<lightning>", "data", "paradigms", "callbacks", "eval", "cli"} == set()


def test_no_cycle_between_subpackages():
    graph = {unit: {to for to in targets if to in RANK} for unit, targets in edges().items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(to == goal or (to not in seen and reaches(to, goal, seen | {to})) for to in graph.get(start, ()))

    assert sorted(unit for unit in graph if reaches(unit, unit, {unit})) == []
