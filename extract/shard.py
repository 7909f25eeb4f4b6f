"""Runner for one shard: read rows, run the backbone, write the shard atomically."""
from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.device import pick_device  # noqa: F401  (re-exported for the runner and benchmarks)
from data.store import ShardData, shard_name, write_shard
from extract.reader import ImageRows, image_loader

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ShardJob:
    """The unit of work: which rows of which kind go into which file."""

    kind: str  # "images" or "texts"
    number: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.kind, self.number)


@dataclass
class ShardResult:
    job: ShardJob
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    truncated: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    written: bool = False


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


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


class Packer:
    """Accumulates encoded batches into one shard's arrays (tokens float16, offsets, normalised embeds)."""

    def __init__(self):
        self.ids, self.views, self.embeds, self.norms, self.tokens, self.counts = [], [], [], [], [], []
        self.queries = []

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
        if lengths is None:
            self.tokens.append(tokens.flatten(0, 1).cpu().numpy())
            self.counts.append(np.full(len(tokens), tokens.shape[1]))
        else:  # strip padding per caption
            mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
            self.tokens.append(tokens[mask].cpu().numpy())
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


def run_image_shard(job, backbone, paths, cfg, device, progress=None) -> tuple[ShardData, ShardResult]:
    result = ShardResult(job)
    rows = list(range(job.start, job.stop))
    dataset = ImageRows([paths[r] for r in rows], rows, cfg.views, backbone.eval_transform(),
                        backbone.train_transform() if cfg.views else None, cfg.seed, backbone.name)
    packer = Packer()
    with torch.inference_mode():
        for ids, views, pixels, bad in image_loader(dataset, cfg.batch_size, cfg.workers):
            result.bad.extend(bad)
            if pixels is None:
                continue
            with autocast(device, cfg.precision):
                enc = backbone.encode_images(pixels.to(device, non_blocking=True))
            tokens = pool_patches(enc.tokens, backbone.patch_grid, cfg.token_pool)
            packer.add(ids, views if cfg.views else None, enc.proj, tokens, None, enc.queries)
            if progress:
                progress.update("images", len(ids))
    return packer.data(), result


def run_text_shard(job, backbone, captions, cfg, device, progress=None) -> tuple[ShardData, ShardResult]:
    result = ShardResult(job)
    packer = Packer()
    with torch.inference_mode():
        for start in range(job.start, job.stop, cfg.batch_size):
            stop = min(start + cfg.batch_size, job.stop)
            tok = backbone.tokenize(list(captions[start:stop]))
            result.truncated += tok.truncated
            inputs = {k: v.to(device) for k, v in tok.inputs.items()}
            with autocast(device, cfg.precision):
                enc = backbone.encode_texts(inputs)
            packer.add(torch.arange(start, stop), None, enc.proj, enc.tokens, enc.lengths)
            if progress:
                progress.update("texts", stop - start)
    return packer.data(), result


def run_shard(job: ShardJob, cfg, index, image_root: Path, attrs: dict, progress=None) -> ShardResult:
    """Encode one shard's rows and write ``<store>/<name>``; a shard with bad images is not written."""
    from data.store import FeatureStore

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    backbone = load_backbone(cfg, device)
    if job.kind == "images":
        paths = [image_root / p for p in index.images]
        data, result = run_image_shard(job, backbone, paths, cfg, device, progress)
    else:
        data, result = run_text_shard(job, backbone, index.captions, cfg, device, progress)
    result.rows = len(data)
    if not result.bad or cfg.skip_bad:
        store = FeatureStore.at(cfg.cache, index.dataset, index.split, cfg.store)
        result.bytes = write_shard(store.root / job.name, data, {**attrs, "kind": job.kind, "start": job.start,
                                                                   "stop": job.stop, "truncated": result.truncated,
                                                                   "bad_images": json.dumps(result.bad)})
        result.written = True
    result.seconds = time.perf_counter() - t0
    return result


@functools.lru_cache(maxsize=2)
def _cached_backbone(name, options, device: str):
    from extract.backbones import create

    return create(name, options).to(torch.device(device))


def load_backbone(cfg, device: torch.device):
    """One backbone per process (and per config), shared by every shard that process runs."""
    return _cached_backbone(cfg.backbone, backbone_options(cfg), str(device))


def backbone_options(cfg):
    from extract.backbones import BackboneOptions

    return BackboneOptions(checkpoint=cfg.checkpoint, model=cfg.model, dataset=cfg.dataset,
                           tokens=cfg.clip_tokens, download=cfg.download)
