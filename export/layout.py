"""clip-retrieval's inference layout, which embedding-reader, autofaiss and clip-retrieval's index and back end read.

``img_emb/img_emb_N.npy`` (images x dim, L2-normalised), ``text_emb/text_emb_N.npy`` (the first caption of each
of those images, row for row) and ``metadata/metadata_N.parquet`` (``image_path``, ``caption``, ``row``: the
image's row in the split index), one triple per part of at most ``part_size`` images. N is zero-padded to the
digits of the part count, so that the readers' lexicographic order is the row order. Parts are written one
block of store rows at a time (memory: one block, whatever the split's size), each file atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data.atomic import atomic_path
from data.errors import PipelineError
from data.index import SplitIndex
from data.progress import Progress
from data.store import FeatureStore

FOLDERS = {"img_emb": "img_emb_{}.npy", "text_emb": "text_emb_{}.npy", "metadata": "metadata_{}.parquet"}
BLOCK = 65536  # store rows read at once


def part_names(parts: int) -> list[dict[str, str]]:
    digits = int(math.log10(parts)) + 1 if parts else 1
    return [{folder: pattern.format(str(p).zfill(digits)) for folder, pattern in FOLDERS.items()}
            for p in range(parts)]


def existing_files(out: Path) -> list[Path]:
    """Parts of an export already in ``out``."""
    return sorted(p for folder, pattern in FOLDERS.items() for p in (out / folder).glob(pattern.format("*")))


def unit_rows(embeds: np.ndarray, dtype: str) -> np.ndarray:
    return (embeds / np.linalg.norm(embeds, axis=1, keepdims=True).clip(1e-12)).astype(dtype)


def fill_part(store: FeatureStore, index: SplitIndex, ids: np.ndarray, images: np.ndarray, texts: np.ndarray) -> None:
    """Write the embeddings of image rows ``ids`` (and of their first captions) into ``images``/``texts``."""
    first = index.caption_offsets[:-1]
    for a in range(0, len(ids), BLOCK):
        block = ids[a:a + BLOCK]
        rows = store.load("images", tokens=False, id_range=(int(block[0]), int(block[-1]) + 1), clean=True)
        if not np.array_equal(rows.ids, block):
            raise PipelineError(f"{store.root}: image rows changed while exporting; rerun `pipeline export`")
        images[a:a + len(block)] = unit_rows(rows.embeds, images.dtype)
        wanted = first[block]
        caps = store.load("texts", tokens=False, id_range=(int(wanted[0]), int(wanted[-1]) + 1))
        texts[a:a + len(block)] = unit_rows(caps.embeds[np.searchsorted(caps.ids, wanted)], texts.dtype)


def write_metadata(path: Path, index: SplitIndex, ids: np.ndarray, image_folder: Path | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = index.caption_offsets[:-1]
    names = [index.images[i] for i in ids]
    table = pa.table({"image_path": [str(image_folder / n) if image_folder else n for n in names],
                      "caption": [index.captions[first[i]] for i in ids],
                      "row": pa.array(ids, pa.int64())})
    pq.write_table(table, path)


def write_export(out: Path, store: FeatureStore, index: SplitIndex, image_folder: Path | None, dtype: str,
                 part_size: int, desc: str = "export") -> tuple[list[dict[str, str]], int]:
    """Every clean image of ``store`` in parts; returns the files of each part and the images written. Parts of
    an earlier export that this one does not overwrite are removed once it is written."""
    ids = store.clean_image_ids()
    if not len(ids):
        raise PipelineError(f"{store.root}: no image rows to export")
    dim = store.dims("images")[1]
    before = existing_files(out)
    parts = part_names(math.ceil(len(ids) / part_size))
    progress = Progress(desc, len(ids), unit="image", logger="pipeline.export")
    for k, names in enumerate(parts):
        part = ids[k * part_size:(k + 1) * part_size]
        with atomic_path(out / "img_emb" / names["img_emb"]) as img_tmp, \
                atomic_path(out / "text_emb" / names["text_emb"]) as txt_tmp, \
                atomic_path(out / "metadata" / names["metadata"]) as meta_tmp:
            images = np.lib.format.open_memmap(img_tmp, mode="w+", dtype=dtype, shape=(len(part), dim))
            texts = np.lib.format.open_memmap(txt_tmp, mode="w+", dtype=dtype, shape=(len(part), dim))
            fill_part(store, index, part, images, texts)
            images.flush(), texts.flush()
            del images, texts
            write_metadata(meta_tmp, index, part, image_folder)
        progress.update(len(part))
    progress.close()
    written = {out / folder / name for names in parts for folder, name in names.items()}
    for stale in set(before) - written:
        stale.unlink()
    return parts, len(ids)
