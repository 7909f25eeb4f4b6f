"""Cached features of one split for a set of backbones, aligned row by row, as PackedFeatures."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from data.errors import PipelineError
from data.index import SplitIndex, index_path
from data.store import FeatureStore, ShardData
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

    def row_table(self, id_start: int = 0) -> torch.Tensor:
        """(images x (views+1)) table of rows, -1 where absent; indexed by (id - id_start, view)."""
        n = int(self.image_ids.max()) + 1 - id_start if len(self.image_ids) else 0
        table = torch.full((n, self.views + 1), -1, dtype=torch.long)
        table[self.image_ids - id_start, self.image_views] = torch.arange(len(self.image_ids))
        return table

    def clean_rows(self) -> torch.Tensor:
        return torch.nonzero(self.image_views == 0).flatten()

    def to(self, device) -> "SplitFeatures":
        return SplitFeatures(self.index, [f.to(device) for f in self.images], [f.to(device) for f in self.texts],
                             self.image_ids, self.image_views, self.views)

    @property
    def image_dims(self) -> tuple[list[int], list[int]]:
        return [f.width for f in self.images], [f.embed_dim for f in self.images]

    @property
    def text_dims(self) -> tuple[list[int], list[int]]:
        return [f.width for f in self.texts], [f.embed_dim for f in self.texts]


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


def _packed(data: ShardData, rows: np.ndarray | None = None) -> PackedFeatures:
    """PackedFeatures from store rows (optionally a subset, in the given order); embeds are the raw projections."""
    if rows is not None and not np.array_equal(rows, np.arange(len(data))):
        counts = np.diff(data.offsets)[rows]
        starts = data.offsets[rows]
        token_rows = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        data = ShardData(ids=data.ids[rows], embeds=data.embeds[rows], norms=data.norms[rows],
                         offsets=np.concatenate([[0], np.cumsum(counts)]), tokens=data.tokens[token_rows])
    return PackedFeatures(torch.from_numpy(data.tokens), torch.from_numpy(data.offsets),
                          torch.from_numpy(data.raw_embeds.astype(np.float32)))


def load_split_features(index: SplitIndex, stores: list[FeatureStore], id_range: tuple[int, int] | None = None,
                        views: bool = True) -> SplitFeatures:
    """Load images and captions (of images with ids in ``id_range``) of every store, aligned by (id, view)."""
    images = [s.load("images", id_range=id_range) for s in stores]
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
        images=[_packed(d, np.searchsorted(k, common)) for d, k in zip(images, keys)],
        texts=[_packed(d) for d in texts],
        image_ids=torch.from_numpy(common // 1024), image_views=torch.from_numpy(common % 1024), views=n_views)


def available_memory() -> int:
    """Bytes of host memory available now (Linux), for choosing in-memory or streaming training."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
