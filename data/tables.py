"""Captions tables: CSV, TSV, JSON Lines and parquet files with an image column and a caption column.

A row holds one caption or a list of them; several rows may name the same image. The image column holds paths
(relative to --images, or absolute without it) or, in parquet, the image itself: bytes, or Hugging Face
`datasets`' {"bytes", "path"} dicts. A ``split`` column, when present, puts each image in its split.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from data.errors import PipelineError
from data.image_source import FolderImages, ParquetCells
from data.records import Collection, ReadOptions, Record, safe_relative

IMAGE_COLUMNS = ("image", "filepath", "file_name", "path", "jpg")
CAPTION_COLUMNS = ("caption", "text", "txt", "sentence")
SPLIT_COLUMN = "split"
KEY_COLUMN = "key"  # names the images of a parquet of bytes (img2dataset writes it); else their row number
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


def pick_column(given: str | None, defaults: tuple[str, ...], present: list[str], flag: str, source) -> str:
    """The column named by ``flag``, or the first default present; a missing one is refused, listing the columns."""
    if given is not None:
        if given not in present:
            raise PipelineError(f"{source}: no column {given!r} ({flag}); its columns: {', '.join(present)}")
        return given
    for name in defaults:
        if name in present:
            return name
    raise PipelineError(f"{source}: none of the columns {', '.join(defaults)}: name yours with {flag} "
                        f"(its columns: {', '.join(present)})")


def caption_list(value) -> list:
    """A cell as captions: one string, a list of them, or nothing (an empty caption, refused or skipped later)."""
    if value is None:
        return [None]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def image_name(value, root: Path | None, where: str) -> str:
    """An image path as the split index names it: relative to --images, or absolute without it."""
    if root is not None:
        return safe_relative(value, where)
    if not Path(value).is_absolute():
        raise PipelineError(f"{where}: image path {value!r} is relative: pass --images DIR (its folder)")
    return value


def folder_records(rows: Iterator[tuple[str, dict]], image: str, caption: str, root: Path | None
                   ) -> Iterator[Record]:
    """Records of (where, row) pairs whose image column holds paths; a row without one is a bad row."""
    for where, row in rows:
        value = row.get(image)
        if not isinstance(value, str) or not value.strip():
            yield Record("", [], None, where, problem=f"no image in column {image!r}")
            continue
        yield Record(image_name(value.strip(), root, where), caption_list(row.get(caption)),
                     row.get(SPLIT_COLUMN) or None, where)


def _csv_rows(path: Path, delimiter: str) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    """CSV as Excel writes it (quoted fields); TSV unquoted, as tab-separated caption files are (a caption may
    begin with a quote)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL

    def reader(f):
        return csv.DictReader(f, delimiter=delimiter, quoting=quoting)

    with open(path, encoding="utf-8-sig", newline="") as f:
        header = list(reader(f).fieldnames or [])

    def rows():
        with open(path, encoding="utf-8-sig", newline="") as f:
            table = reader(f)
            try:
                for row in table:
                    yield f"line {table.line_num} of {path}", row
            except csv.Error as e:
                raise PipelineError(f"line {table.line_num} of {path}: not valid {path.suffix[1:].upper()}: {e}") \
                    from None
    return header, rows()


def _jsonl_rows(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    def rows():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PipelineError(f"line {n} of {path}: not valid JSON: {e}") from None
                if not isinstance(row, dict):
                    raise PipelineError(f"line {n} of {path}: not a JSON object")
                yield f"line {n} of {path}", row
    first = rows()
    header = list(next(first, ("", {}))[1])
    first.close()  # closes the file
    return header, rows()


def read_text_table(path: Path, fmt: str, root: Path | None, options: ReadOptions) -> Collection:
    """A CSV, TSV or JSON Lines file of image paths and captions."""
    header, rows = _jsonl_rows(path) if fmt == "jsonl" else _csv_rows(path, "\t" if fmt == "tsv" else ",")
    image = pick_column(options.image_column, IMAGE_COLUMNS, header, "--image-column", path)
    caption = pick_column(options.caption_column, CAPTION_COLUMNS, header, "--caption-column", path)
    return Collection(str(path), folder_records(rows, image, caption, root), lambda refs: FolderImages(root))


def read_parquet(path: Path, root: Path | None, options: ReadOptions) -> Collection:
    """A parquet file whose image column holds paths, bytes, or {"bytes", "path"} dicts; read in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PipelineError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    image = pick_column(options.image_column, IMAGE_COLUMNS, schema.names, "--image-column", path)
    caption = pick_column(options.caption_column, CAPTION_COLUMNS, schema.names, "--caption-column", path)
    kind = schema.field(image).type
    is_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        holds = "paths"
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or is_struct:
        holds = "bytes"
    else:
        raise PipelineError(f"{path}: column {image!r} holds {kind}, not image paths, bytes or {{bytes, path}} dicts; "
                            f"name the image column with --image-column")
    columns = [caption] + [c for c in (SPLIT_COLUMN, KEY_COLUMN) if c in schema.names and c not in (image, caption)]
    if holds == "paths":
        columns.append(image)
    elif is_struct and kind.get_field_index("path") >= 0:
        columns.append(f"{image}.path")  # the names only: the bytes are read by the shard jobs, row by row

    def rows():
        n = 0
        try:
            for batch in pf.iter_batches(batch_size=4096, columns=columns):
                for row in batch.to_pylist():
                    yield n, f"row {n} of {path}", row
                    n += 1
        except (pa.ArrowException, OSError) as e:
            raise PipelineError(f"{path}: unreadable after row {n} ({e})") from None

    if holds == "paths":
        return Collection(str(path), folder_records(((where, row) for _, where, row in rows()), image, caption, root),
                          lambda refs: FolderImages(root))

    def byte_records():
        for n, where, row in rows():
            named = (row.get(image) or {}).get("path") if is_struct else None
            name = row.get(KEY_COLUMN) or named or f"{n:09d}"
            yield Record(str(name), caption_list(row.get(caption)), row.get(SPLIT_COLUMN) or None, where, n)
    return Collection(str(path), byte_records(),
                      lambda refs: ParquetCells(path, image, np.asarray(refs, np.int64), root))
