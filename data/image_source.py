"""Where a split's images are read from: files in a folder, members of tar shards, or cells of a parquet file.

A split index names its images; its source turns index rows into references a shard job decodes: a ``Path``
for a file, or an object with ``read() -> bytes`` (its ``str`` names it in errors). Byte sources hold one
location per row (tar file and member offset, parquet row), so a job reads exactly its own rows, streaming,
wherever it runs; nothing holds a collection's images in memory.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FolderImages:
    """Image ``name`` is the file ``root / name`` (``root`` None: the names are absolute paths)."""

    root: Path | None

    def refs(self, index, rows: list[int]) -> list[Path]:
        return [Path(index.images[r]) if self.root is None else self.root / index.images[r] for r in rows]

    def resolve(self) -> "FolderImages":
        """The same source with an absolute folder (dask workers may run in another folder)."""
        return self if self.root is None else FolderImages(self.root.resolve())

    def hint(self) -> str:
        return f"is {self.root} their folder?" if self.root is not None else "do their paths exist on this machine?"


@dataclass(frozen=True)
class TarMember:
    """One image stored in an uncompressed tar: ``size`` bytes at ``offset`` (size -1: the sample has no image)."""

    tar: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"

    def read(self) -> bytes:
        if self.size < 0:
            raise FileNotFoundError("the sample has no image member")
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"the tar ends {self.size - len(data)} bytes into the member")
        return data


@dataclass(frozen=True)
class TarMembers:
    """Row r's image is ``size[r]`` bytes at ``offset[r]`` of ``tars[tar[r]]``."""

    tars: tuple[Path, ...]
    tar: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    pattern: str = ""

    def refs(self, index, rows: list[int]) -> list[TarMember]:
        return [TarMember(self.tars[self.tar[r]], index.images[r], int(self.offset[r]), int(self.size[r]))
                for r in rows]

    def resolve(self) -> "TarMembers":
        return replace(self, tars=tuple(p.resolve() for p in self.tars))

    def hint(self) -> str:
        return f"are the shards {self.pattern} intact?"


class RowGroups:
    """Reads one parquet column's cells by row, a row group at a time; keeps the last two groups (one job's
    threads ask for nearby rows, so a group is read once)."""

    def __init__(self, path: Path, column: str, keep: int = 2):
        import pyarrow.parquet as pq

        self.path, self.column, self.keep = path, column, keep
        self.file = pq.ParquetFile(path)
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.groups: OrderedDict[int, object] = OrderedDict()
        self.lock = threading.Lock()

    def cell(self, row: int):
        group = int(np.searchsorted(self.starts, row, side="right")) - 1
        with self.lock:
            if group not in self.groups:
                self.groups[group] = self.file.read_row_group(group, columns=[self.column]).column(0)
                while len(self.groups) > self.keep:
                    self.groups.popitem(last=False)
            self.groups.move_to_end(group)
            return self.groups[group][row - int(self.starts[group])].as_py()


@dataclass(frozen=True)
class ParquetCell:
    """Row ``row`` of a parquet image column: bytes, a {"bytes", "path"} dict, or (no bytes) a path under ``root``."""

    cells: RowGroups
    row: int
    name: str
    root: Path | None

    def __str__(self) -> str:
        return f"{self.cells.path}:{self.cells.column}[{self.row}] ({self.name})"

    def read(self) -> bytes:
        value = self.cells.cell(self.row)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            if self.root is None:
                raise FileNotFoundError(f"no image bytes, only the path {value!r}: pass --images DIR (its folder)")
            return (self.root / value).read_bytes()
        raise FileNotFoundError("no image in this cell")


@dataclass(frozen=True)
class ParquetCells:
    """Row r's image is row ``rows[r]`` (counted from the file's start) of column ``column`` of ``path``."""

    path: Path
    column: str
    rows: np.ndarray
    root: Path | None = None

    def refs(self, index, rows: list[int]) -> list[ParquetCell]:
        cells = RowGroups(self.path, self.column)  # one reader per job: its threads share the groups it reads
        return [ParquetCell(cells, int(self.rows[r]), index.images[r], self.root) for r in rows]

    def resolve(self) -> "ParquetCells":
        return replace(self, path=self.path.resolve(), root=self.root.resolve() if self.root else None)

    def hint(self) -> str:
        return f"does column {self.column!r} of {self.path} hold images?"
