"""Mapper: batches through the backbone -> one shard's arrays (normalised embeddings, float16 node features)."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from data.device import autocast
from data.store import ShardData


def pool_patches(tokens: torch.Tensor, grid: int, pool: int) -> torch.Tensor:
    """Average-pool the square patch grid behind rows 1.. by ``pool``; row 0 (global node) is kept."""
    if pool <= 1 or grid == 0:
        return tokens
    b, n, w = tokens.shape
    if n != grid * grid + 1:
        raise ValueError(f"expected {grid * grid + 1} image rows (global + {grid}x{grid} patches), got {n}")
    patches = tokens[:, 1:].reshape(b, grid, grid, w).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(patches, pool, ceil_mode=True).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :1], pooled], dim=1)


class NonFiniteFeatures(ValueError):
    """Rows whose features are not finite (NaN, or beyond float16's range once stored): nothing is written."""

    def __init__(self, ids: list[int]):
        super().__init__(f"non-finite features for rows {ids}")
        self.ids = ids


class Packer:
    """Accumulates encoded batches into one shard's arrays (tokens float16, offsets, normalised embeds).

    Features that are not finite as stored (NaN or inf from the backbone, or float16 overflow of the node
    features, beyond +-65504) are collected in ``nonfinite`` (split-index rows; views of an image count once).
    """

    def __init__(self):
        self.ids, self.views, self.embeds, self.norms, self.tokens, self.counts = [], [], [], [], [], []
        self.queries, self.nonfinite = [], []

    def _check(self, ids, proj: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None,
               queries: torch.Tensor | None) -> None:
        finite = torch.isfinite(tokens) if valid is None else torch.isfinite(tokens) | ~valid[..., None]
        ok = finite.flatten(1).all(1) & torch.isfinite(proj).all(1)
        if queries is not None:
            ok &= torch.isfinite(queries.float()).flatten(1).all(1)
        if not bool(ok.all()):
            self.nonfinite.extend(int(i) for i in ids[~ok.cpu()].tolist() if int(i) not in self.nonfinite)

    def add(self, ids, views, proj: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor | None,
            queries: torch.Tensor | None = None) -> None:
        if queries is not None:  # one retrieval embedding per query (BLIP-2), normalised like embeds
            self.queries.append(torch.nn.functional.normalize(queries.float(), dim=-1).cpu().numpy())
        proj = proj.float()
        norms = proj.norm(dim=-1)
        self.ids.append(ids.numpy())
        self.views.append(views.numpy() if views is not None else None)
        self.embeds.append((proj / norms.clamp_min(1e-12)[:, None]).cpu().numpy())
        self.norms.append(norms.cpu().numpy())
        tokens = tokens.to(torch.float16)
        valid = None if lengths is None else \
            torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        self._check(ids, proj, tokens, valid, queries)
        if lengths is None:
            self.tokens.append(tokens.flatten(0, 1).cpu().numpy())
            self.counts.append(np.full(len(tokens), tokens.shape[1]))
        else:  # strip padding per caption
            self.tokens.append(tokens[valid].cpu().numpy())
            self.counts.append(lengths.cpu().numpy())

    def data(self) -> ShardData:
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, np.int64)
        views = None if not self.views or self.views[0] is None else np.concatenate(self.views)
        return ShardData(
            ids=np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64),
            embeds=np.concatenate(self.embeds) if self.embeds else np.zeros((0, 0), np.float32),
            norms=np.concatenate(self.norms) if self.norms else np.zeros(0, np.float32),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            tokens=np.concatenate(self.tokens) if self.tokens else np.zeros((0, 0), np.float16),
            view=views, query_embeds=np.concatenate(self.queries) if self.queries else None)


def map_images(backbone, batches: Iterable[tuple], cfg, device: torch.device, progress=None) -> tuple[ShardData, list]:
    """Encode reader batches; returns the shard's arrays and the (row, error) of every image that failed to load."""
    packer, bad = Packer(), []
    with torch.inference_mode():
        for ids, views, pixels, failed in batches:
            bad.extend(failed)
            if pixels is None:
                continue
            with autocast(device, cfg.precision):
                enc = backbone.encode_images(pixels.to(device, non_blocking=True))
            tokens = pool_patches(enc.tokens, backbone.patch_grid, cfg.token_pool)
            packer.add(ids, views if cfg.views else None, enc.proj, tokens, None, enc.queries)
            if progress:
                progress.update(len(ids), "images")
    if packer.nonfinite:
        raise NonFiniteFeatures(packer.nonfinite)
    return packer.data(), bad


def map_texts(backbone, captions, start: int, stop: int, cfg, device: torch.device,
              progress=None) -> tuple[ShardData, int]:
    """Encode captions ``start:stop`` in batches; returns the shard's arrays and how many were truncated."""
    packer, truncated = Packer(), 0
    with torch.inference_mode():
        for a in range(start, stop, cfg.batch_size):
            z = min(a + cfg.batch_size, stop)
            tok = backbone.tokenize(list(captions[a:z]))
            truncated += tok.truncated
            inputs = {k: v.to(device) for k, v in tok.inputs.items()}
            with autocast(device, cfg.precision):
                enc = backbone.encode_texts(inputs)
            packer.add(torch.arange(a, z), None, enc.proj, enc.tokens, enc.lengths)
            if progress:
                progress.update(z - a, "texts")
    if packer.nonfinite:
        raise NonFiniteFeatures(packer.nonfinite)
    return packer.data(), truncated
