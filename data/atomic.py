"""Atomic, durable file writes: write under a temporary name in the same folder, flush it to disk, rename, and
flush the folder, so that after a crash or a power loss the file is either the old one or the new one, whole."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator

from data.errors import PipelineError


def tmp_path_for(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's: its entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it is flushed and replaces ``path``, on error it is removed."""
    path = Path(path)
    if path.is_dir():  # refused before any work, naming the target rather than the temporary file
        raise IsADirectoryError(errno.EISDIR, "Is a directory, not a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        try:
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)  # the rename itself is durable only once the folder is flushed
        except OSError as e:
            raise type(e)(e.errno, e.strerror, str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file this project wrote; one that is empty or cut off is refused by name, not with a traceback."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        raise PipelineError(f"{path} {what}: it was cut off (a crash or power loss while it was written?). "
                            f"Remove it and rerun the command that wrote it") from None
