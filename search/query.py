"""A query through a run: each backbone live, as its store was made (checked against the store's fingerprint),
then the run's fused encoder, giving one embedding comparable with the run's cached fused embeddings."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from data.errors import PipelineError
from data.store import FeatureStore, ShardData, describe_difference
from extract.backbones import Backbone, load
from extract.config import ExtractConfig
from extract.mapper import map_images, map_texts
from extract.reader import ImageRows, image_batches
from extract.run import VERSION_KEYS
from fuse import checkpoint
from fuse.config import FuseConfig
from fuse.data import packed_rows
from fuse.encode import encode_rows, fused_weight
from fuse.model import HadaModel, model_from_checkpoint

log = logging.getLogger("pipeline.search")


def store_config(store: FeatureStore) -> ExtractConfig:
    """The extraction settings a store was made with (its manifest's config), weights never downloaded."""
    saved = store.manifest().get("config")
    if not saved:
        raise PipelineError(f"the store at {store.root} records no extraction settings (made by an older version): "
                            f"re-extract it to search with it")
    known = {f.name for f in dataclasses.fields(ExtractConfig)}
    return ExtractConfig(**{**{k: v for k, v in saved.items() if k in known}, "download": False})


def live_backbone(store: FeatureStore, device: torch.device) -> tuple[Backbone, ExtractConfig]:
    """The store's backbone loaded now, refused when any setting that changes its features differs from the
    store's fingerprint (then the query would not be embedded like the candidates)."""
    cfg = store_config(store)
    backbone = load(cfg.backbone, cfg.backbone_options(), device)
    stored = store.manifest()["fingerprint"]
    live = {k: v for k, v in backbone.describe().items() if k not in VERSION_KEYS}
    differ = {k for k in live if stored.get(k) != live[k]}
    if differ:
        raise PipelineError(
            f"backbone {cfg.backbone} as loaded now differs from its store at {store.root}: "
            f"{describe_difference({k: stored.get(k) for k in differ}, {k: live[k] for k in differ})}. "
            f"The query must be embedded by the same weights and preprocessing as the candidates: restore them, "
            f"or re-extract and re-fuse")
    return backbone, cfg


def embed_text(backbone: Backbone, cfg: ExtractConfig, text: str, device: torch.device) -> ShardData:
    """One caption's row, exactly as extraction stores it (float16 nodes, normalised embedding and its norm)."""
    return map_texts(backbone, [text], 0, 1, cfg, device)[0]


def embed_image(backbone: Backbone, cfg: ExtractConfig, path: Path, device: torch.device) -> ShardData:
    """One image's row (its clean view), exactly as extraction stores it; an unreadable file is refused by name."""
    rows = ImageRows([path], [0], 0, backbone.eval_transform(), None, backbone=backbone.name)
    data, bad = map_images(backbone, image_batches(rows, 1, 0), dataclasses.replace(cfg, views=0), device)
    if bad:
        raise PipelineError(f"--image {bad[0][1]}")
    return data


def load_fused(run_dir: Path, device: torch.device) -> HadaModel:
    """The run's best checkpoint as an eval-mode model."""
    saved = checkpoint.read_config(run_dir)
    state = checkpoint.load(run_dir / "best.pt", f"run {run_dir.name!r}")
    return model_from_checkpoint(state, FuseConfig.from_dict(saved["config"]), device)


def fuse_query(model: HadaModel, side: str, rows: list[ShardData], device: torch.device) -> np.ndarray:
    """The fused embedding of one sample (``side``: images or texts) from each backbone's row, in the run's
    backbone order, encoded as the cached embeddings are (``fuse.encode.encode_rows``)."""
    encoder = model.image_encoder if side == "images" else model.text_encoder
    return encode_rows(encoder, [packed_rows(d) for d in rows], torch.arange(1), device, 1,
                       fused_weight(model))[0].numpy()


def embed_query(run_dir: Path, stores: list[FeatureStore], text: str | None, image: str | None,
                device: torch.device) -> np.ndarray:
    """The query's fused embedding: every backbone of the run loaded and checked first (weights fail fast)."""
    loaded = [live_backbone(s, device) for s in stores]
    rows = [embed_image(b, cfg, Path(image), device) if image else embed_text(b, cfg, text, device)
            for b, cfg in loaded]
    model = load_fused(run_dir, device)
    if model.cfg.reference_bug:
        log.warning("run %s was trained with --reference-bug: a sample's fused embedding depends on its batch, so "
                    "the query (encoded alone) is not embedded exactly as the cached candidates were", run_dir.name)
    return fuse_query(model, "images" if image else "texts", rows, device)
