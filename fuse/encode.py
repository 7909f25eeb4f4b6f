"""Fused embeddings of a split from the cache, their validation recall, and writing them as a store."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from data.store import FeatureStore, ShardData, write_shard
from evaluate.coverage import recall_with_missing
from evaluate.weighted import mix_embeddings
from fuse.batch import gather_batch
from fuse.config import FuseConfig
from fuse.data import SplitFeatures
from fuse.model import HadaModel

log = logging.getLogger("pipeline.fuse")


def eval_batch_size(cfg: FuseConfig) -> int:
    """Samples per encoding batch. With ``--reference-bug`` a sample's output depends on its batch, so encode
    as the reference evaluates: in split-index order, batches of half the training batch."""
    return max(1, cfg.batch_size // 2) if cfg.model.reference_bug else 512


@torch.no_grad()
def _encode(encoder, features, rows: torch.Tensor, device, batch: int, w: float | None) -> torch.Tensor:
    out = []
    for k in range(0, len(rows), batch):
        blocks = gather_batch(features, rows[k:k + batch], device)
        emb = encoder(blocks).float()
        out.append((emb if w is None else mix_embeddings(emb, blocks[0].embeds, w)).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_split(model: HadaModel, features: SplitFeatures, device, batch: int = 512):
    """(image ids, image embeddings of the clean views, caption embeddings), float32 on the CPU, in
    split-index order.

    With the weighted second stage the embeddings are ``evaluate.weighted.mix_embeddings``: a plain dot
    product is then HADA's mixed score (1-w) * fused + w * first backbone's.
    """
    was_training = model.training
    model.eval()
    w = float(model.mixing_weight()) if model.cfg.weighted else None
    try:
        rows = features.clean_rows()
        images = _encode(model.image_encoder, features.images, rows, device, batch, w)
        texts = _encode(model.text_encoder, features.texts, torch.arange(len(features.texts[0])), device, batch, w)
    finally:
        model.train(was_training)
    return features.image_ids[rows].numpy(), images, texts


def recall_of(image_ids: np.ndarray, images: torch.Tensor, texts: torch.Tensor, features: SplitFeatures) -> dict:
    """Recall of fused embeddings; images excluded at extraction count as misses."""
    index = features.index
    return recall_with_missing(images @ texts.T, image_ids, index.text_to_image, len(index.images))


def write_fused(root: Path, image_ids, images: torch.Tensor, texts: torch.Tensor, fingerprint: dict) -> FeatureStore:
    """Fused embeddings in the feature-store schema (no token rows), so scoring reads them like any backbone."""
    store = FeatureStore(root)
    if store.exists() and store.manifest()["fingerprint"] != fingerprint:
        for old in root.glob("*.h5"):  # a newer best checkpoint: these embeddings are derived, redo them
            old.unlink()
        store.manifest_path.unlink()
    manifest = store.claim(fingerprint)
    for kind, ids, emb in (("images", np.asarray(image_ids), images), ("texts", np.arange(len(texts)), texts)):
        emb = emb.numpy().astype(np.float32)
        data = ShardData(ids=ids.astype(np.int64), embeds=emb, norms=np.linalg.norm(emb, axis=1).astype(np.float32),
                         offsets=np.zeros(len(ids) + 1, np.int64), tokens=np.zeros((0, 0), np.float16))
        write_shard(root / f"{kind}-00000.h5", data, {**fingerprint, "kind": kind})
    manifest.update(shards={"images": ["images-00000.h5"], "texts": ["texts-00000.h5"]}, bad_images=[])
    store.finish(manifest)
    return store
