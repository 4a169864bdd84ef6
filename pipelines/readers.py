"""Input files, row by row: CSV, JSON (an array, or one object per line), JSON Lines and Parquet.

Every reader streams (one row, or one Parquet batch, in memory at a time) and never raises on a
bad row: a row it cannot parse comes out as a `RawRow` with an `error` (a reject reason) and no
values, so the caller can account for it. Row numbers let a user find a row without the platform
ever repeating its content: the line a record starts on for CSV and JSON Lines, the 1-based
position of the record for Parquet and JSON arrays. Blank lines are not rows.

Error reasons never include the offending text: it may hold PHI.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
# A CSV field may hold a whole report; this cap only bounds the memory a runaway quote can take
# (the recipe's max_field_chars rejects long fields far below it).
CSV_FIELD_CAP = 128 * 2**20
# How far a JSON array element may grow before the rest of the file is given up as malformed.
JSON_ELEMENT_CAP = 128 * 2**20
_CHUNK = 1 << 20


class RawRow(NamedTuple):
    row: int  # line number (CSV, JSON Lines) or 1-based record position (Parquet, JSON array)
    values: dict[str, Any] | None  # column -> value, None when the row could not be parsed
    error: str | None = None  # the reject reason when values is None


def file_format(path: str | Path) -> str | None:
    return FORMATS.get(Path(path).suffix.lower())


def iter_rows(path: str | Path, encoding: str = "utf-8", columns: list[str] | None = None) -> Iterator[RawRow]:
    """The rows of one file. `columns` (Parquet only) limits what is read; other formats parse whole rows."""
    fmt = file_format(path)
    if fmt == "csv":
        yield from _csv_rows(path, encoding)
    elif fmt == "jsonl":
        yield from _jsonl_rows(path, encoding)
    elif fmt == "json":
        yield from (_json_array_rows(path, encoding) if _starts_with(path, encoding, "[") else
                    _jsonl_rows(path, encoding))
    elif fmt == "parquet":
        yield from _parquet_rows(path, columns)
    else:
        raise ValueError(f"{Path(path).name}: unsupported format")


def column_names(path: str | Path, encoding: str = "utf-8", sample: int = 100) -> set[str]:
    """The columns of a file: the CSV header, the Parquet schema, or the keys of the first
    `sample` JSON records (empty for an empty file). Raises OSError or ValueError when the file
    cannot be read at all."""
    fmt = file_format(path)
    if fmt == "parquet":
        return set(pq.read_schema(path).names)
    if fmt == "csv":
        with open(path, encoding=encoding, errors="surrogateescape", newline="") as fh:
            header = next(csv.reader(fh), [])
        return {_strip_bom(h) for h in header}
    names: set[str] = set()
    seen = 0
    for raw in iter_rows(path, encoding):
        if raw.values is not None:
            names.update(raw.values)
            seen += 1
            if seen >= sample:
                break
    return names


def _strip_bom(name: str) -> str:
    return name.lstrip("\ufeff").strip()


def _starts_with(path: str | Path, encoding: str, char: str) -> bool:
    with open(path, encoding=encoding, errors="surrogateescape") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped.startswith(char)
    return False


def _csv_rows(path: str | Path, encoding: str) -> Iterator[RawRow]:
    csv.field_size_limit(CSV_FIELD_CAP)
    # Undecodable bytes become lone surrogates (surrogateescape); the caller rejects such rows.
    with open(path, encoding=encoding, errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        header = [_strip_bom(h) for h in next(reader, [])]
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error:
                # Bad quoting: the parser resumes on the next line.
                yield RawRow(start, None, "malformed_csv")
                continue
            if not fields:
                continue
            if len(fields) != len(header):
                yield RawRow(start, None, "malformed_csv")
                continue
            yield RawRow(start, dict(zip(header, fields)))


def _jsonl_rows(path: str | Path, encoding: str) -> Iterator[RawRow]:
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = line.decode(encoding)
            except UnicodeDecodeError:
                yield RawRow(number, None, "bad_encoding")
                continue
            yield _json_record(number, text)


def _json_record(number: int, text: str) -> RawRow:
    try:
        value = json.loads(text)
    except ValueError:
        return RawRow(number, None, "malformed_json")
    if not isinstance(value, dict):
        return RawRow(number, None, "not_an_object")
    return RawRow(number, value)


def _json_array_rows(path: str | Path, encoding: str) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, decoded one at a time from a sliding buffer."""
    decoder = json.JSONDecoder()
    with open(path, encoding=encoding, errors="surrogateescape") as fh:
        buf, eof = "", False
        pos = -1
        while pos < 0:  # find the opening bracket
            chunk = fh.read(_CHUNK)
            eof = not chunk
            buf += chunk
            pos = buf.find("[")
            if eof and pos < 0:
                return
        pos += 1
        number = 0
        while True:
            while True:  # skip separators, reading on when the buffer runs out
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = buf[pos:] + fh.read(_CHUNK), 0
                eof = pos == len(buf)
            if pos >= len(buf) or buf[pos] == "]":
                return
            number += 1
            try:
                value, end = decoder.raw_decode(buf, pos)
            except ValueError:
                if eof or len(buf) - pos > JSON_ELEMENT_CAP:
                    # Without a parsable element there is no telling where the next one starts.
                    yield RawRow(number, None, "malformed_json")
                    return
                chunk = fh.read(_CHUNK)
                buf, pos, eof = buf[pos:] + chunk, 0, not chunk
                number -= 1
                continue
            yield RawRow(number, value) if isinstance(value, dict) else RawRow(number, None, "not_an_object")
            pos = end


def _parquet_rows(path: str | Path, columns: list[str] | None) -> Iterator[RawRow]:
    parquet = pq.ParquetFile(path)
    wanted = [c for c in columns if c in parquet.schema_arrow.names] if columns is not None else None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
        for values in batch.to_pylist():
            number += 1
            yield RawRow(number, values)
