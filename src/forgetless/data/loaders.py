"""Record loaders: JSONL, JSON list, CSV, TSV, TRACE and ``datasets`` folders saved to disk.

Each loader returns ``(where, record)`` pairs, where ``where`` names the file and the line or record
("train.jsonl line 17"), so that a bad record anywhere is reported with its position before any
compute starts. Field mapping and prompt templates are applied later (``data/spec.py``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetless.errors import InputError
from forgetless.registry import Registry

Record = dict[str, Any]
Loader = Callable[[Path], list[tuple[str, Record]]]
LOADERS: Registry[Loader] = Registry("data format")

_BY_SUFFIX = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


def detect_format(path: Path) -> str:
    """The loader name for ``path``: a ``datasets`` folder, or by file extension."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets"
        raise InputError(f"{path} is a folder but not a `datasets` save_to_disk folder; give a data file")
    if path.suffix.lower() not in _BY_SUFFIX:
        raise InputError(
            f"{path}: cannot tell the data format from the extension '{path.suffix}'; "
            f"set format to one of {', '.join(LOADERS.names())}"
        )
    return _BY_SUFFIX[path.suffix.lower()]


def load_records(
    path: str | Path, data_format: str = "auto", split: str | None = None
) -> list[tuple[str, Record]]:
    """Read every record of ``path``; one ``InputError`` naming the file and line on any problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"data file {path} does not exist; check the path in the task spec")
    name = detect_format(path) if data_format == "auto" else data_format
    loader = LOADERS.get(name)
    if name == "datasets":
        return _load_datasets(path, split)
    records = loader(path)
    if not records:
        raise InputError(f"{path}: no records found; the file is empty")
    return records


@LOADERS.register("jsonl")
def _load_jsonl(path: Path) -> list[tuple[str, Record]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{where}: invalid JSON ({error.msg} at column {error.colno}); fix or remove the line"
                ) from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            records.append((where, record))
    return records


@LOADERS.register("json")
def _load_json(path: Path) -> list[tuple[str, Record]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path} line {error.lineno}: invalid JSON ({error.msg}); a JSON list of objects is expected"
        ) from None
    if isinstance(data, dict):
        # {"data": [...]} / {"examples": [...]} wrappers are common; accept a single list value.
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise InputError(
                f"{path}: expected a JSON list of records (or an object holding exactly one list)"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise InputError(f"{path} record {index}: expected an object, got {type(record).__name__}")
        records.append((f"{path} record {index}", record))
    return records


@LOADERS.register("trace")
def _load_trace(path: Path) -> list[tuple[str, Record]]:
    """TRACE benchmark files: a JSON list of ``{"prompt", "answer"}`` objects."""
    records = _load_json(path)
    for where, record in records:
        missing = [key for key in ("prompt", "answer") if key not in record]
        if missing:
            raise InputError(
                f"{where}: TRACE records need 'prompt' and 'answer'; missing {', '.join(missing)}"
            )
    return records


def _load_delimited(path: Path, delimiter: str) -> list[tuple[str, Record]]:
    records = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return []
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise InputError(
                    f"{where}: {len(row)} columns, the header has {len(header)} ({', '.join(header)})"
                )
            records.append((where, dict(zip(header, row))))
    return records


@LOADERS.register("csv")
def _load_csv(path: Path) -> list[tuple[str, Record]]:
    """CSV with a header row."""
    return _load_delimited(path, ",")


@LOADERS.register("tsv")
def _load_tsv(path: Path) -> list[tuple[str, Record]]:
    """Tab-separated. With a header row it is used; without one (``text<TAB>label`` lines, as in the
    LFPT5 few-shot sets) the columns are called ``text`` and ``label``."""
    with open(path, encoding="utf-8") as handle:
        first = handle.readline().rstrip("\n").split("\t")
    if first and set(first) & {"text", "label", "prompt", "answer", "sentence"}:
        return _load_delimited(path, "\t")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise InputError(
                    f"{path} line {number}: expected 'text<TAB>label', found {len(parts)} columns"
                )
            records.append((f"{path} line {number}", {"text": parts[0], "label": parts[1]}))
    return records


@LOADERS.register("datasets")
def _load_datasets_placeholder(path: Path) -> list[tuple[str, Record]]:  # dispatched in load_records
    return _load_datasets(path, None)


def _load_datasets(path: Path, split: str | None) -> list[tuple[str, Record]]:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{path}: not a readable `datasets` folder ({error})") from None
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise InputError(f"{path}: a DatasetDict with splits {', '.join(data)}; name one as the split")
        data = data[split]
    assert isinstance(data, Dataset)
    return [(f"{path} [{split or 'dataset'}] row {index}", dict(row)) for index, row in enumerate(data)]
