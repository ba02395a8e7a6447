"""Read raw records from the places users keep data, with errors that say where.

    records = read_records("prefs.jsonl")          # -> list[Record]
    records = read_records("builtin:hhh", split="test")

Supported sources: ``.jsonl``, ``.json`` (a top-level array of objects), ``.parquet``,
``.csv``, a directory written by ``datasets.Dataset.save_to_disk`` (or by
``DatasetDict.save_to_disk``, then ``split`` picks the split) and ``builtin:<name>``.

Each ``Record`` remembers where it came from so that every later error can name the
file, the position and the field. The position ``Record.line`` is:

* JSONL: the 1-based line number in the file (empty lines are skipped but counted);
* JSON array, Parquet, CSV, ``datasets`` directory, ``builtin:``: the 1-based row, i.e.
  the index of the record in the array/table (CSV: not counting the header line).

Parquet/``datasets`` columns are shared by all rows, so a null cell is read as an absent
field. CSV cells are kept as strings (no type guessing; ``alignkit.data.formats`` reads the usual boolean
spellings of a CSV cell where a bool is expected, e.g. the KTO ``label``).

A UTF-8 byte-order mark at the start of a JSONL, JSON or CSV file is skipped. A key that appears twice
in one JSON object is an error naming the line (JSONL) or row (JSON) and the key: JSON parsers would
silently keep the last one.

Messages say ``line N`` for JSONL and ``row N`` for the others (``Record.unit``).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = (".jsonl", ".json", ".parquet", ".csv", "a saved `datasets` directory", "builtin:<name>")
BUILTIN_PREFIX = "builtin:"


class DataError(ValueError):
    """A data file or record is malformed.

    The message is ``"{file}, line {line}, field '{field}': {what}"``; ``line`` reads ``row``
    for tabular sources, and the line/field parts are left out when unknown (``None``).
    ``what`` says what was expected, e.g. ``"expected a non-empty string, got int"``.
    """

    def __init__(self, file: str, line: int | None, field: str | None, what: str, unit: str = "line"):
        self.file, self.line, self.field, self.what, self.unit = str(file), line, field, what, unit
        where = self.file
        if line is not None:
            where += f", {unit} {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # picklable across worker processes despite the custom __init__
        return (DataError, (self.file, self.line, self.field, self.what, self.unit))


@dataclass(frozen=True)
class Record:
    """One raw record: its fields, the source it was read from and its position there."""

    data: dict[str, Any]
    source: str
    line: int

    @property
    def unit(self) -> str:
        return unit_for(self.source)


def unit_for(source: str) -> str:
    """``"line"`` for JSONL sources (positions are line numbers), ``"row"`` for every other source."""
    return "line" if str(source).lower().endswith(".jsonl") else "row"


def type_name(value: Any) -> str:
    """JSON-flavoured type name used in messages: ``got int``, ``got list``, ``got null``."""
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------- decoding helpers
def _decode(raw: bytes, file: str, first_line: int = 1, line_offset: int = 0) -> str:
    """UTF-8 decode; on failure name the line and the byte offset (from the start of the file)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise DataError(
            file, line, None, f"is not valid UTF-8 (byte offset {line_offset + e.start}: {e.reason})"
        ) from None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, without a leading UTF-8 byte-order mark (as ``encoding="utf-8-sig"`` reads it)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(str(path), None, None, f"cannot be read ({e.strerror or e})") from None
    return raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw


class _DuplicateKeys(dict):
    """A JSON object in which a key appeared more than once (``duplicate`` is the first such key)."""

    duplicate: str = ""


def _pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a plain dict, or a ``_DuplicateKeys`` marking the object that repeats a key."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            marked = _DuplicateKeys(pairs)
            marked.duplicate = key
            return marked
        out[key] = value
    return out


def _find_duplicate(obj: Any, path: str = "") -> str | None:
    """The field path (``messages[0].role``) of the first repeated key in ``obj``, or None."""
    if isinstance(obj, _DuplicateKeys):
        return f"{path}.{obj.duplicate}" if path else obj.duplicate
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for where, value in items:
        found = _find_duplicate(value, where)
        if found is not None:
            return found
    return None


def _check_duplicates(obj: Any, file: str, line: int | None, unit: str) -> None:
    key = _find_duplicate(obj)
    if key is not None:
        raise DataError(file, line, key, "duplicate key in one JSON object (JSON would silently keep the last "
                        "value); keep one", unit=unit)


# ---------------------------------------------------------------- per-format readers
def _read_jsonl(path: Path) -> list[Record]:
    file, raw = str(path), _read_bytes(path)
    records: list[Record] = []
    offset = 0
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        text = _decode(chunk, file, first_line=lineno, line_offset=offset)
        offset += len(chunk) + 1
        if not text.strip():
            continue  # empty lines are not data
        try:
            obj = json.loads(text, object_pairs_hook=_pairs_to_dict)
        except json.JSONDecodeError as e:
            raise DataError(file, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(file, lineno, None, f"expected a JSON object, got {type_name(obj)}")
        _check_duplicates(obj, file, lineno, "line")
        records.append(Record(obj, file, lineno))
    return records


def _read_json(path: Path) -> list[Record]:
    file = str(path)
    text = _decode(_read_bytes(path), file)
    try:
        obj = json.loads(text, object_pairs_hook=_pairs_to_dict)
    except json.JSONDecodeError as e:
        raise DataError(file, e.lineno, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        _check_duplicates(obj, file, None, "row")
    if not isinstance(obj, list):
        raise DataError(
            file, None, None, f"expected a JSON array of objects at the top level, got {type_name(obj)}"
        )
    records = []
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise DataError(file, i, None, f"expected a JSON object, got {type_name(item)}", unit="row")
        _check_duplicates(item, file, i, "row")
        records.append(Record(item, file, i))
    return records


def _read_csv(path: Path) -> list[Record]:
    """CSV cells are kept as strings (no type guessing: ``"true"`` stays a string here)."""
    file = str(path)
    text = _decode(_read_bytes(path), file)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        header = reader.fieldnames or []
        dupes = sorted({name for name in header if header.count(name) > 1})
        if dupes:
            raise DataError(file, None, dupes[0], "the header names this column more than once; keep one")
        for i, row in enumerate(reader, start=1):
            if None in row:
                raise DataError(
                    file, i, None, f"has {len(reader.fieldnames or []) + len(row[None])} cells but the header "
                    f"has {len(reader.fieldnames or [])} columns", unit="row",
                )
            records.append(Record({k: v for k, v in row.items() if v is not None}, file, i))
    except csv.Error as e:
        raise DataError(file, reader.line_num, None, f"invalid CSV ({e})") from None
    return records


def _drop_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """Tabular sources share one schema, so a field a record lacks reads as null: drop it (= absent)."""
    return {k: v for k, v in row.items() if v is not None}


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    file = str(path)
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(file, None, None, f"is not a readable Parquet file ({e})") from None
    return [Record(_drop_nulls(row), file, i) for i, row in enumerate(rows, start=1)]


def _read_datasets_dir(path: Path, split: str) -> list[Record]:
    import datasets

    file = str(path)
    try:
        ds = datasets.load_from_disk(file)
    except Exception as e:  # FileNotFoundError / ValueError / pyarrow errors
        raise DataError(file, None, None, f"is not a directory saved with datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(file, None, None, f"has no split {split!r}; available splits: {sorted(ds)}")
        ds, file = ds[split], f"{file}[{split}]"
    return [Record(_drop_nulls(row), file, i) for i, row in enumerate(ds.to_list(), start=1)]


def _read_builtin(name: str, split: str) -> list[Record]:
    source = BUILTIN_PREFIX + name
    try:
        from alignkit.data.builtin import BUILTIN_DATASETS  # lazy: optional assets, heavy imports
    except ImportError as e:
        raise DataError(source, None, None, f"built-in datasets are unavailable ({e})") from None
    if name not in BUILTIN_DATASETS:
        raise DataError(source, None, None, f"unknown built-in dataset; available: {sorted(BUILTIN_DATASETS)}")
    rows = BUILTIN_DATASETS[name](split)
    records = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(source, i, None, f"expected a dict, got {type_name(row)}", unit="row")
        records.append(Record(row, source, i))
    return records


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_records(spec: str, split: str = "train") -> list[Record]:
    """Read every record of ``spec`` (a path or ``builtin:<name>``) as a list of ``Record``.

    Raises ``DataError`` for a missing file, an unsupported extension, bytes that are not
    UTF-8 (naming line and byte offset), invalid JSON (naming the line) and non-object
    records. Content is not validated here; see ``alignkit.data.formats``.
    """
    if not spec:
        raise DataError("<no data>", None, None, "no data path given (set data.train, e.g. data.train=prefs.jsonl)")
    if spec.startswith(BUILTIN_PREFIX):
        return _read_builtin(spec[len(BUILTIN_PREFIX):], split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(spec, None, None, "no such file or directory")
    if path.is_dir():
        return _read_datasets_dir(path, split)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            spec, None, None, f"unsupported file type {path.suffix or '(no extension)'!r}; supported: "
            + ", ".join(SUPPORTED)
        )
    return reader(path)
