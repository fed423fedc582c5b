"""Training text from `DataConfig.sources`: the bundled corpus, .txt / .jsonl / .parquet files,
or directories of them, read as a list of documents in a fixed order.

A .txt file is one document; a JSONL line or a Parquet row is one document (its `text_field`).
Directories are walked recursively in sorted order; files of other types there are skipped
(a README beside the data is normal), but a file named directly must have a supported type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moetron.data import shakespeare
from moetron.data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")


def source_files(source: str) -> list[Path]:
    """The data files one (non-bundled) source names, sorted; raises DataError if there are none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {source!r} does not exist (resolved to {path.resolve()})")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"data source {source!r}: unsupported file type {path.suffix!r}; use {SUFFIXES}")
        return [path]
    # Hidden files and folders (.git, editor swap files) are never data.
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"data source {source!r} is a directory with no {'/'.join(SUFFIXES)} files")
    return files


def fingerprint(sources: list[str]) -> list[dict[str, Any]]:
    """Each input file with its size and mtime: cheap to compute (stat only) and part of the cache
    key, so editing, adding or removing a file rebuilds the shards."""
    out: list[dict[str, Any]] = []
    for source in sources:
        if source == shakespeare.NAME:
            out.append(dict(shakespeare.fingerprint()))
            continue
        for path in source_files(source):
            stat = path.stat()
            out.append(
                {
                    "source": source,
                    "path": str(path.resolve()),
                    "bytes": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                }
            )
    return out


def read_documents(sources: list[str], text_field: str = "text") -> list[str]:
    """All documents of all sources, in order. Whitespace-only documents are dropped; a source that
    yields none at all is an error naming it."""
    documents: list[str] = []
    for source in sources:
        if source == shakespeare.NAME:
            found = shakespeare.documents()
        else:
            found = [
                doc for path in source_files(source) for doc in _read_file(path, text_field) if doc.strip()
            ]
        if not found:
            raise DataError(f"data source {source!r} contains no text (empty files or documents)")
        documents.extend(found)
    return documents


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield _decode(path, path.read_bytes())
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    else:
        yield from _read_parquet(path, text_field)


def _decode(where: Path | str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (bad byte at offset {e.start})") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            line = _decode(f"{path}:{line_number}", raw).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{line_number}: no field {text_field!r} (found {keys}); set data.text_field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'moetron[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (found {columns}); set data.text_field")
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, not strings")
            if text is not None:
                yield text
