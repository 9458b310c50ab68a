"""Read raw rows (dicts) from a source, each tagged with where it came from.

Locations are ``<path>:line <n>`` (1-based) for JSON Lines files and ``<path>:row <i>``
(0-based, as ``dataset[i]``) for JSON arrays, parquet files and Hugging Face datasets. A row that
cannot be read (invalid JSON, bytes that are not UTF-8, not an object) is yielded as a
``RecordError`` in its place so the caller can report several problems at once.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Union

import pyarrow.parquet as pq

# Hugging Face datasets imported lazily: it takes ~1 s and only dataset names and saved
# datasets need it (`nemo-aot --help` and local files must not pay for it).

LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")


class RecordError(ValueError):
    """A problem with one record: ``<location>: <problem>. Fix: <fix>``."""

    def __init__(self, location: str, problem: str, fix: str):
        super().__init__(f"{location}: {problem}. Fix: {fix}")
        self.location = location


RowOrError = tuple[str, Union[dict, RecordError]]


def iter_rows(path: str, split: str = "train") -> Iterator[RowOrError]:
    """Yield ``(location, row_or_error)`` for every record of ``path``.

    ``path`` is a local .jsonl/.json/.parquet file, a folder written by ``save_to_disk``, a local
    folder of data files, or a dataset name for ``datasets.load_dataset`` (``split`` picks the
    split for the last three).
    """
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext == ".jsonl":
            yield from _iter_jsonl(path)
        elif ext == ".json":
            yield from _iter_json(path)
        elif ext == ".parquet":
            yield from _iter_parquet(path)
        else:
            raise ValueError(f"{path}: unsupported file type {ext!r}. Fix: use one of "
                             f"{list(LOCAL_EXTENSIONS)}, or a dataset folder or name")
    elif os.path.isdir(path):
        yield from _iter_hf(path, split)
    elif path.lower().endswith(LOCAL_EXTENSIONS) or path.startswith((".", os.sep)):
        raise ValueError(f"{path}: file not found. Fix: check the path (relative paths are "
                         f"resolved from the working directory {os.getcwd()!r})")
    else:
        yield from _iter_hf(path, split)


def _iter_jsonl(path: str) -> Iterator[RowOrError]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            location = f"{path}:line {number}"
            text = _decode(raw, location, strip_bom=number == 1)
            if isinstance(text, RecordError):
                yield location, text
            elif text.strip():
                yield location, _parse_object(text, location)


def _iter_json(path: str) -> Iterator[RowOrError]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        yield f"{path}:line {line}", RecordError(
            f"{path}:line {line}",
            f"contains bytes that are not UTF-8 ({data[e.start:e.start + 1]!r})",
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        return
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        if "Extra data" in e.msg:  # JSON Lines saved with a .json name, as datasets accepts
            yield from _iter_jsonl(path)
            return
        location = f"{path}:line {e.lineno}"
        yield location, RecordError(location, f"invalid JSON ({e.msg} at column {e.colno})",
                                    "fix the JSON syntax, or save one object per line as .jsonl")
        return
    if not isinstance(parsed, list):
        location = f"{path}:line 1"
        yield location, RecordError(location, f"expected a JSON array of records, got "
                                              f"{type(parsed).__name__}",
                                    "store a list of objects, or one object per line as .jsonl")
        return
    for i, item in enumerate(parsed):
        location = f"{path}:row {i}"
        yield location, item if isinstance(item, dict) else _not_object(location, item)


def _iter_parquet(path: str) -> Iterator[RowOrError]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"{path}: cannot be read as parquet ({type(e).__name__}: {e}). "
                         f"Fix: rewrite the file with pyarrow or pandas.to_parquet") from e
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _iter_hf(path: str, split: str) -> Iterator[RowOrError]:
    dataset = _load_hf(path, split)
    for i, row in enumerate(dataset):
        yield f"{path}[{split}]:row {i}", row


def _load_hf(path: str, split: str):
    import datasets

    try:
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            loaded = datasets.load_from_disk(path)
        elif os.path.isfile(os.path.join(path, "state.json")):
            return datasets.load_from_disk(path)
        else:
            return datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not load"
        raise ValueError(f"{path}: datasets could not load split {split!r} "
                         f"({type(e).__name__}: {e}). Fix: check the dataset name and "
                         f"data.train_split / data.validation_split; offline, only local files "
                         f"and folders load") from e
    if split not in loaded:
        raise ValueError(f"{path}: saved DatasetDict has no split {split!r} (has {list(loaded)}). "
                         f"Fix: set data.train_split / data.validation_split")
    return loaded[split]


def _decode(raw: bytes, location: str, strip_bom: bool) -> Union[str, RecordError]:
    try:
        return raw.decode("utf-8-sig" if strip_bom else "utf-8")
    except UnicodeDecodeError as e:
        return RecordError(location, f"contains bytes that are not UTF-8 at byte {e.start} "
                           f"({raw[e.start:e.start + 1]!r})",
                           "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _parse_object(text: str, location: str) -> Union[dict, RecordError]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError(location, f"invalid JSON ({e.msg} at column {e.colno})",
                           "write exactly one complete JSON object per line")
    return value if isinstance(value, dict) else _not_object(location, value)


def _not_object(location: str, value) -> RecordError:
    return RecordError(location, f"expected a JSON object, got {type(value).__name__}",
                       "make each record an object with the format's keys")
