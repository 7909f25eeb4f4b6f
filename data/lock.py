"""One writer at a time: an advisory lock file (``fcntl.flock``) held for the whole of a write.

The kernel releases the lock when its holder exits, however it exits (``kill -9`` included), so a lock is
never stale. A second writer is refused at once, with the holder's pid and host, which the holder writes into
the lock file when it takes the lock. On a shared filesystem (a dask cluster's), the lock spans hosts only
where the filesystem supports ``flock`` (NFSv4, Lustre and most cluster filesystems do).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from data.errors import PipelineError

LOCK_NAME = ".lock"


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (retried briefly: it writes right after taking the lock)."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode("utf-8", errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "a process that did not say who it is"


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str, advice: str) -> Iterator[Path]:
    """Hold ``<folder>/.lock`` for the block; another holder means PipelineError naming ``what``, the holder and
    ``advice`` (what the user can do)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"{what} is being written by another process ({_holder(fd)}): {advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
