"""Rows of a local data file (JSON Lines, JSON, CSV/TSV, Parquet): the one reader that `hubforge plan` and the
data stage share, so both see the same rows and report the same problems.

    from hubforge.datarows import read_rows
    rows, skipped = read_rows(Path("recipes/data/chat.jsonl"), "recipes/data/chat.jsonl")
    # skipped: ["recipes/data/chat.jsonl:3: not JSON (Expecting value at column 1)", ...]

A record that is not a JSON object is skipped and named (`file:line: what`); a file that cannot be read as a
whole (not UTF-8, malformed CSV or Parquet, unsupported type) raises StageError naming the file, the line and how
to fix it, never a bare decoding traceback.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

from hubforge.errors import StageError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_rows(path: Path, name: str | None = None) -> tuple[list[dict], list[str]]:
    """(rows that are JSON objects, one `name:line: problem` per skipped record) of one data file."""
    name = name or str(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise StageError(f"data.files: {name}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist(), []
        except (OSError, pyarrow.ArrowException) as exc:
            raise StageError(f"data.files: {name}: not a readable Parquet file ({exc})") from None
    text = _text(path, name)
    if suffix in (".csv", ".tsv"):
        try:
            return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")), []
        except csv.Error as exc:
            raise StageError(f"data.files: {name}: malformed {suffix[1:].upper()} ({exc})") from None
    if suffix == ".json":
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None  # JSON Lines saved as .json: read line by line below
        if whole is not None:
            records = whole if isinstance(whole, list) else [whole]
            if isinstance(whole, dict):  # {"data": [...]}: the first list inside
                records = next((v for v in whole.values() if isinstance(v, list)), records)
            return _objects((f"{name}: record {i + 1}", r) for i, r in enumerate(records))
    return _objects(_lines(text, name))


def _text(path: Path, name: str) -> str:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise StageError(f"data.files: {name}: cannot read ({exc.strerror})") from None
    skip = len(codecs.BOM_UTF8) if blob.startswith(codecs.BOM_UTF8) else 0  # a BOM (Excel's CSV) is not data
    try:
        return blob[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        line = blob[:at].count(b"\n") + 1
        raise StageError(f"data.files: {name}:{line}: not UTF-8 (byte 0x{blob[at]:02x} at offset {at}); "
                         "save the file as UTF-8") from None


def _lines(text: str, name: str):
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{name}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{name}:{number}", _NotJson(f"{exc.msg} at column {exc.colno}")
            except RecursionError:
                yield f"{name}:{number}", _NotJson("nested too deeply")


class _NotJson(str):
    """A line that did not parse; the string says why."""


def _objects(records) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    for where, record in records:
        if isinstance(record, dict):
            rows.append(record)
        elif isinstance(record, _NotJson):
            skipped.append(f"{where}: not JSON ({record})")
        else:
            skipped.append(f"{where}: a JSON {type(record).__name__}, not an object")
    return rows, skipped
