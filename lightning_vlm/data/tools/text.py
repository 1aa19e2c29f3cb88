"""Text-only shards: a user's paragraphs and question-answer pairs, for a generative recipe's language rehearsal.

A ``.txt`` file holds paragraphs separated by blank lines; a ``.jsonl`` file rows with ``text``, or ``question`` and
``answer`` (written as the question, a newline, the answer). Each text becomes one sample of ``txt`` (and ``json``:
its kind, source file and fields), written by `convert.write_records` to ``out/<split>/`` with a manifest that
records the split as ``modality: text``, so a `ShardSource` reads it as text only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_vlm.data.tools.convert import update_manifest, write_records
from lightning_vlm.errors import InvalidSettingError, MissingInputError

SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class TextRow:
    """One text to train on, and the record of where it came from (``json``)."""

    text: str
    meta: dict[str, Any]


def read_texts(path: Path) -> list[TextRow]:
    """The texts of one ``.txt`` or ``.jsonl`` file; a missing or empty file, or a row without a text, is refused
    in one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"text file {path} does not exist")
    if path.suffix not in SUFFIXES:
        raise InvalidSettingError(f"{path}: a text file must be .txt (paragraphs) or .jsonl, got {path.suffix!r}")
    content = path.read_text(encoding="utf-8")
    rows = _jsonl_rows(path, content) if path.suffix == ".jsonl" else _paragraphs(path, content)
    if not rows:
        raise InvalidSettingError(f"{path} holds no text")
    return rows


def qa_text(question: str, answer: str) -> str:
    """A question-answer pair as one text: the question, a newline, the answer."""
    return f"{question.strip()}\n{answer.strip()}"


def write_texts(rows: Iterable[TextRow], out: Path, split: str, samples_per_shard: int,
                source: dict[str, Any]) -> tuple[int, list[str]]:
    """Write the rows as text-only samples to ``out/split/shard-*.tar`` (replacing that split) and record the split,
    as ``modality: text``, in the manifest; returns the count and the shards (relative to ``out``)."""
    out = Path(out)
    records = ({"__key__": f"{index:09d}", "txt": row.text.encode("utf-8"),
                "json": json.dumps(row.meta, ensure_ascii=False).encode("utf-8")} for index, row in enumerate(rows))
    written, count = write_records(records, out / split, samples_per_shard)
    shards = [path.relative_to(out).as_posix() for path in written]
    update_manifest(out, split, count, shards, source, modality="text")
    return count, shards


def convert_texts(files: Sequence[Path], out: Path, split: str = "train", samples_per_shard: int = 1000) -> str:
    """``data convert text``: every file read (all of them checked before anything is written), then sharded;
    returns the report line."""
    rows = [row for path in files for row in read_texts(Path(path))]
    source = {"format": "text", "files": [str(path) for path in files]}
    count, shards = write_texts(rows, out, split, samples_per_shard, source)
    return f"wrote {count} texts in {len(shards)} shards to {out} (split {split!r}, modality text)"


def _paragraphs(path: Path, content: str) -> list[TextRow]:
    """Blank-line-separated paragraphs, each on one line (spacing normalised)."""
    blocks = [" ".join(block.split()) for block in content.replace("\r\n", "\n").split("\n\n")]
    return [TextRow(block, {"kind": "paragraph", "source": path.name}) for block in blocks if block]


def _jsonl_rows(path: Path, content: str) -> list[TextRow]:
    rows = []
    for line_number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidSettingError(f"{path} line {line_number}: not JSON ({error.msg})") from None
        rows.append(_jsonl_row(record, f"{path} line {line_number}", path.name))
    return rows


def _jsonl_row(record: Any, where: str, source: str) -> TextRow:
    """A row's text: its ``text``, or its ``question`` and ``answer``, none of them empty."""
    fields = record if isinstance(record, dict) else {}
    if _filled(fields, "text"):
        return TextRow(fields["text"].strip(), {"kind": "text", "source": source})
    if _filled(fields, "question") and _filled(fields, "answer"):
        return TextRow(qa_text(fields["question"], fields["answer"]),
                       {"kind": "qa", "source": source, "question": fields["question"], "answer": fields["answer"]})
    raise InvalidSettingError(f'{where}: a row needs a non-empty "text", or "question" and "answer"; it has '
                              f"{sorted(fields) if fields else type(record).__name__}")


def _filled(fields: dict[str, Any], name: str) -> bool:
    return isinstance(fields.get(name), str) and bool(fields[name].strip())
