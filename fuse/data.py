"""Cached features of one split for a set of backbones, aligned row by row, as PackedFeatures."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from data.errors import PipelineError
from data.index import SplitIndex, index_path
from data.store import FeatureStore, ShardData, read_rows, token_rows
from fuse.batch import PackedFeatures

log = logging.getLogger("pipeline.fuse")


@dataclass
class SplitFeatures:
    """Images (every stored view) and captions of a split, one PackedFeatures per backbone.

    Image row r is image ``image_ids[r]`` in view ``image_views[r]`` (0 = clean) in every backbone;
    caption row j is caption j of the index. Images excluded at extraction are absent.
    """

    index: SplitIndex
    images: list[PackedFeatures]
    texts: list[PackedFeatures]
    image_ids: torch.Tensor
    image_views: torch.Tensor
    views: int  # augmented views per image (0: clean only)
    _tables: dict = field(default_factory=dict, init=False, repr=False)

    def row_table(self, id_start: int = 0) -> torch.Tensor:
        """(images x (views+1)) table of rows, -1 where absent; indexed by (id - id_start, view). Cached."""
        if id_start not in self._tables:
            n = int(self.image_ids.max()) + 1 - id_start if len(self.image_ids) else 0
            table = torch.full((n, self.views + 1), -1, dtype=torch.long)
            table[self.image_ids - id_start, self.image_views] = torch.arange(len(self.image_ids))
            self._tables[id_start] = table
        return self._tables[id_start]

    def image_rows(self, images: torch.Tensor, views: torch.Tensor, id_start: int = 0) -> torch.Tensor:
        """Rows of ``images`` (split image ids) in ``views``; the clean row where an image lacks that view."""
        table = self.row_table(id_start)
        local = images - id_start
        views = views.clamp_max(self.views)
        rows = table[local, views]
        return torch.where(rows >= 0, rows, table[local, 0])

    def clean_rows(self) -> torch.Tensor:
        return torch.nonzero(self.image_views == 0).flatten()

    def to(self, device) -> "SplitFeatures":
        return SplitFeatures(self.index, [f.to(device) for f in self.images], [f.to(device) for f in self.texts],
                             self.image_ids, self.image_views, self.views)


def open_stores(cache: str, dataset: str, split: str, backbones: list[str]) -> tuple[SplitIndex, list[FeatureStore]]:
    """The split index and each backbone's store, refusing missing ones and stores of another index version."""
    index = SplitIndex.load(index_path(cache, dataset, split))
    stores = []
    for name in backbones:
        store = FeatureStore.at(cache, dataset, split, name)
        if not store.exists():
            raise PipelineError(f"backbone {name!r} has no {split} store at {store.root}: run "
                                f"`pipeline extract --backbone {name} --dataset {dataset} --split {split}`")
        version = store.manifest()["fingerprint"].get("index_version")
        if version != index.version:
            raise PipelineError(f"store {store.root} was made from split index version {version}, "
                                f"but {index_path(cache, dataset, split)} is version {index.version}: re-extract it")
        stores.append(store)
    return index, stores


def store_dims(stores: list[FeatureStore]) -> dict[str, list[int]]:
    """The model's input widths, per backbone: node width and embedding size of image and text rows."""
    image, text = [s.dims("images") for s in stores], [s.dims("texts") for s in stores]
    return {"image_tokens": [w for w, _ in image], "image_embeds": [e for _, e in image],
            "text_tokens": [w for w, _ in text], "text_embeds": [e for _, e in text]}


def packed_rows(data: ShardData, rows: np.ndarray | None = None) -> PackedFeatures:
    """PackedFeatures from store rows (optionally a subset, in the given order); embeds are the raw projections."""
    if rows is not None and not np.array_equal(rows, np.arange(len(data))):
        counts = np.diff(data.offsets)[rows]
        data = ShardData(ids=data.ids[rows], embeds=data.embeds[rows], norms=data.norms[rows],
                         offsets=np.concatenate([[0], np.cumsum(counts)]),
                         tokens=data.tokens[token_rows(data.offsets[rows], counts)])
    return PackedFeatures(torch.from_numpy(data.tokens), torch.from_numpy(data.offsets),
                          torch.from_numpy(data.raw_embeds.astype(np.float32)))


def load_split_features(index: SplitIndex, stores: list[FeatureStore], id_range: tuple[int, int] | None = None,
                        views: bool = True) -> SplitFeatures:
    """Load images and captions (of images with ids in ``id_range``) of every store, aligned by (id, view);
    ``views=False``: clean images only (augmented views are not read)."""
    images = [s.load("images", id_range=id_range, clean=not views) for s in stores]
    n_views = min(int(d.view.max()) if d.view is not None else 0 for d in images) if views else 0
    keys = []
    for d in images:
        view = d.view.astype(np.int64) if d.view is not None else np.zeros(len(d), np.int64)
        keys.append(d.ids * 1024 + view)
    common = keys[0]
    for k in keys[1:]:
        common = np.intersect1d(common, k)
    common = common[(common % 1024) <= n_views]
    caption_off = index.caption_offsets
    a, b = id_range or (0, len(index.images))
    texts = [s.load("texts", id_range=(int(caption_off[a]), int(caption_off[b]))) for s in stores]
    return SplitFeatures(
        index=index,
        images=[packed_rows(d, np.searchsorted(k, common)) for d, k in zip(images, keys)],
        texts=[packed_rows(d) for d in texts],
        image_ids=torch.from_numpy(common // 1024), image_views=torch.from_numpy(common % 1024), views=n_views)


def available_memory() -> int:
    """Bytes of host memory available now (Linux), for choosing in-memory or streaming training."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget_gb(memory_gb: float | None) -> float:
    """--memory-gb, or when it is left out 70% of the host memory available now (in GB, rounded to 0.01)."""
    return memory_gb if memory_gb else round(0.7 * available_memory() / 1e9, 2)


def load_rows(stores: list[FeatureStore], kind: str, id_range: tuple[int, int]) -> tuple[np.ndarray, list]:
    """(ids, one PackedFeatures per store) of one kind's rows with ids in ``id_range``, clean views only, aligned:
    the ids every store holds."""
    data = [s.load(kind, id_range=id_range, clean=True) for s in stores]
    ids = data[0].ids
    for d in data[1:]:
        ids = np.intersect1d(ids, d.ids)
    return ids, [packed_rows(d, np.searchsorted(d.ids, ids)) for d in data]


def bytes_per_row(stores: list[FeatureStore], kind: str) -> float:
    """Mean bytes one row of ``kind`` takes in memory, summed over the stores."""
    total = 0.0
    for store in stores:
        rows = sum(read_rows(p) for p in store.shard_paths(kind))
        total += store.nbytes(kind) / max(rows, 1)
    return total


def plan_blocks(stores: list[FeatureStore], n_images: int, memory_gb: float | None) -> list[tuple[int, int]]:
    """One block (all in memory) when the features fit the budget, else contiguous image-id blocks to stream."""
    need = sum(s.nbytes("images") + s.nbytes("texts") for s in stores)
    budget = memory_budget_gb(memory_gb) * 1e9
    if need <= budget:
        log.info("train features: %.2f GB, held in memory (budget %.2f GB)", need / 1e9, budget / 1e9)
        return [(0, n_images)]
    # half the budget per block leaves room for the next one; at most one block per image
    n_blocks = min(math.ceil(need / (0.5 * budget)), max(n_images, 1))
    log.info("train features: %.2f GB exceed the memory budget of %.2f GB: streaming %d blocks of ~%d images, "
             "shuffled by block and within each block", need / 1e9, budget / 1e9, n_blocks,
             math.ceil(n_images / n_blocks))
    edges = [round(k * n_images / n_blocks) for k in range(n_blocks + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def place(features: SplitFeatures, device: torch.device) -> SplitFeatures:
    """Move the features into GPU memory when they take less than half of what is free there."""
    if device.type != "cuda":
        return features
    need = sum(f.tokens.numel() * f.tokens.element_size() + f.embeds.numel() * 4
               for f in features.images + features.texts)
    free, _ = torch.cuda.mem_get_info(device)
    if need < 0.5 * free:
        log.info("features (%.2f GB) moved to GPU memory", need / 1e9)
        return features.to(device)
    return features


def present_images(stores: list[FeatureStore], n_images: int) -> np.ndarray:
    """Image rows of the split that every store holds (images skipped at extraction are absent)."""
    keep = np.ones(n_images, dtype=bool)
    for store in stores:
        keep[store.bad_images()] = False
    return np.flatnonzero(keep)


def stored_views(stores: list[FeatureStore]) -> int:
    """Augmented views per image that every store holds (0: clean images only)."""
    return min(int(s.manifest()["fingerprint"].get("views", 0)) for s in stores)
