"""Reader: image rows of a split -> batches of decoded, preprocessed tensors, decoded by a pool of threads.

Threads rather than processes: they also work inside a dask worker (a daemonic process, which may not
start children), and JPEG decoding, resizing and the tensor conversions release the GIL.
"""
from __future__ import annotations

import io
import warnings
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageFile

# A truncated JPEG must fail, not decode as grey: PIL's default already refuses, keep it so.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class NamedBytes(io.BytesIO):
    """An image's bytes that PIL's errors name by where they came from, not by a memory address."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:
        return repr(self.label)


def load_rgb(path) -> Image.Image:
    """Decode fully (so truncated files fail here) and convert grayscale, CMYK, palette and alpha to RGB.

    ``path``: a file, or an image held in a tar or parquet (``read()`` gives its bytes: data/image_source.py).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path if isinstance(path, Path) else NamedBytes(path.read(), str(path))) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")


def view_rng(seed: int, row: int, view: int, backbone: str) -> np.random.Generator:
    """One generator per (image, view, backbone): a view is identical on every rerun, whatever thread or machine
    decodes it, and each backbone's view k is augmented independently (the reference crops each backbone's
    input on its own)."""
    return np.random.default_rng([seed, row, view, zlib.crc32(backbone.encode())])


class ImageRows:
    """Items are (row, view, pixels or None, error or None); view 0 is the clean eval transform.

    View k > 0 is ``augment(image, view_rng(seed, row, k, backbone))``: a generator for this item alone, so
    items can be decoded in any order, by any thread.
    """

    def __init__(self, paths: list, rows: list[int], views: int, eval_tf: Callable,
                 augment: Callable | None, seed: int = 0, backbone: str = ""):
        self.paths, self.rows, self.views = paths, rows, views
        self.eval_tf, self.augment, self.seed, self.backbone = eval_tf, augment, seed, backbone

    def __len__(self) -> int:
        return len(self.rows) * (self.views + 1)

    def __getitem__(self, i: int):
        k, view = divmod(i, self.views + 1)
        row = self.rows[k]
        try:
            image = load_rgb(self.paths[k])
        except Exception as e:  # any decode failure is reported by name, never silently skipped
            return row, view, None, f"{self.paths[k]}: {type(e).__name__}: {e}"
        if view == 0:
            return row, view, self.eval_tf(image), None
        return row, view, self.augment(image, view_rng(self.seed, row, view, self.backbone)), None


def collate(items):
    """Stack the good images; pass failures through by name."""
    good = [it for it in items if it[2] is not None]
    bad = [(it[0], it[3]) for it in items if it[2] is None]
    rows = torch.tensor([it[0] for it in good], dtype=torch.long)
    views = torch.tensor([it[1] for it in good], dtype=torch.long)
    pixels = torch.stack([it[2] for it in good]) if good else None
    if pixels is not None and torch.cuda.is_available():
        pixels = pixels.pin_memory()  # lets the copy to the GPU overlap
    return rows, views, pixels, bad


def image_batches(rows: ImageRows, batch_size: int, workers: int, ahead: int = 2) -> Iterator[tuple]:
    """Collated batches in item order; items decoded by ``workers`` threads (0: here), up to ``ahead`` batches early."""
    batches = [range(s, min(s + batch_size, len(rows))) for s in range(0, len(rows), batch_size)]
    if workers == 0:
        for items in batches:
            yield collate([rows[i] for i in items])
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    try:
        pending: deque = deque()
        for items in batches:
            pending.append([pool.submit(rows.__getitem__, i) for i in items])
            if len(pending) > ahead:
                yield collate([f.result() for f in pending.popleft()])
        while pending:
            yield collate([f.result() for f in pending.popleft()])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
