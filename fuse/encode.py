"""Fused embeddings of a split from the cache, their validation recall, and writing them as a store."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from data.errors import PipelineError
from data.store import FeatureStore, ShardData, write_shard
from evaluate.coverage import recall_with_missing
from evaluate.weighted import mix_embeddings
from fuse.batch import gather_batch
from fuse.config import FuseConfig
from fuse.data import SplitFeatures, bytes_per_row, load_rows
from fuse.model import HadaModel

log = logging.getLogger("pipeline.fuse")


def eval_batch_size(cfg: FuseConfig) -> int:
    """Samples per encoding batch. With ``--reference-bug`` a sample's output depends on its batch, so encode
    as the reference evaluates: in split-index order, batches of half the training batch."""
    return max(1, cfg.batch_size // 2) if cfg.model.reference_bug else 512


def fused_weight(model: HadaModel) -> float | None:
    """The weighted stage's w, which fused embeddings are mixed with (``mix_embeddings``); None otherwise."""
    return float(model.mixing_weight()) if model.cfg.weighted else None


@torch.no_grad()
def encode_rows(encoder, features, rows: torch.Tensor, device, batch: int, w: float | None) -> torch.Tensor:
    """Fused embeddings of ``rows`` of ``features`` (one side's PackedFeatures per backbone), ``batch`` at a time,
    float32 on the CPU; mixed with the first backbone's when ``w`` (:func:`fused_weight`) is not None."""
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
    w = fused_weight(model)
    try:
        rows = features.clean_rows()
        images = encode_rows(model.image_encoder, features.images, rows, device, batch, w)
        texts = encode_rows(model.text_encoder, features.texts, torch.arange(len(features.texts[0])), device, batch, w)
    finally:
        model.train(was_training)
    return features.image_ids[rows].numpy(), images, texts


def id_blocks(ids: np.ndarray, per_block: int) -> list[tuple[int, int]]:
    """Id ranges [a, b) holding ``per_block`` of the sorted ``ids`` each (the last one the rest)."""
    starts = ids[::per_block]
    return [(int(a), int(starts[k + 1]) if k + 1 < len(starts) else int(ids[-1]) + 1) for k, a in enumerate(starts)]


def rows_per_block(bytes_per_row: float, budget_gb: float, multiple: int = 1) -> int:
    """Rows per streamed block: half the budget (the rest is for the model and the output), a multiple of
    ``multiple`` (at least one)."""
    rows = int(0.5 * budget_gb * 1e9 / max(bytes_per_row, 1.0))
    return max(multiple, rows // multiple * multiple)


@torch.no_grad()
def encode_stores(model: HadaModel, index, stores: list[FeatureStore], device, batch: int, budget_gb: float,
                  present: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """``encode_split``'s result for a split read from its stores block by block: clean views only (augmented
    views are never read), each block within half of ``budget_gb``; ``present``: the image ids to expect.

    Images and captions are read in separate passes. With --reference-bug, where a sample's output depends on
    its batch, the blocks hold whole encoding batches, so the batches are those of a single pass."""
    was_training = model.training
    model.eval()
    w = fused_weight(model)
    out = {}
    try:
        for kind, encoder, ids in (("images", model.image_encoder, present),
                                   ("texts", model.text_encoder, np.arange(len(index.captions)))):
            per_block = rows_per_block(bytes_per_row(stores, kind), budget_gb,
                                       batch if model.cfg.reference_bug else 1)
            blocks = id_blocks(ids, per_block) if len(ids) else []
            if len(blocks) > 1:
                log.info("encoding %s %s in %d blocks of %d (memory budget %.2f GB)", index.describe(), kind,
                         len(blocks), per_block, budget_gb)
            got_ids, embs = [], []
            for block in blocks:
                block_ids, features = load_rows(stores, kind, block)
                embs.append(encode_rows(encoder, features, torch.arange(len(block_ids)), device, batch, w))
                got_ids.append(block_ids)
            out[kind] = (np.concatenate(got_ids) if got_ids else np.zeros(0, np.int64),
                         torch.cat(embs) if embs else torch.zeros(0, model.cfg.embed_dim))
    finally:
        model.train(was_training)
    if len(out["texts"][0]) != len(index.captions):
        raise PipelineError(f"the stores of {index.describe()} hold {len(out['texts'][0])} captions, its index "
                            f"{len(index.captions)}: re-extract them")
    return out["images"][0], out["images"][1], out["texts"][1]


def recall_of(image_ids: np.ndarray, images: torch.Tensor, texts: torch.Tensor, features: SplitFeatures) -> dict:
    """Recall of fused embeddings; images excluded at extraction count as misses."""
    index = features.index
    return recall_with_missing(images @ texts.T, image_ids, index.text_to_image, len(index.images))


def write_fused(root: Path, image_ids, images: torch.Tensor, texts: torch.Tensor, fingerprint: dict) -> FeatureStore:
    """Fused embeddings in the feature-store schema (no token rows), so scoring reads them like any backbone."""
    store = FeatureStore(root)
    with store.writing():
        store_fused(store, image_ids, images, texts, fingerprint)
    return store


def store_fused(store: FeatureStore, image_ids, images: torch.Tensor, texts: torch.Tensor, fingerprint: dict) -> None:
    """``write_fused`` for a caller that holds the store's lock."""
    root = store.root
    if store.exists() and store.manifest()["fingerprint"] != fingerprint:
        for old in root.glob("*.h5"):  # another checkpoint or other stores: these are derived, redo them
            old.unlink()
        store.manifest_path.unlink()
    manifest = store.claim(fingerprint)
    for kind, ids, emb in (("images", np.asarray(image_ids), images), ("texts", np.arange(len(texts)), texts)):
        emb = emb.numpy().astype(np.float32)
        data = ShardData(ids=ids.astype(np.int64), embeds=emb, norms=np.linalg.norm(emb, axis=1).astype(np.float32),
                         offsets=np.zeros(len(ids) + 1, np.int64), tokens=np.zeros((0, 0), np.float16))
        write_shard(root / f"{kind}-00000.h5", data, {**_flat(fingerprint), "kind": kind})
    manifest.update(shards={"images": ["images-00000.h5"], "texts": ["texts-00000.h5"]}, bad_images=[])
    store.finish(manifest)


def _flat(fingerprint: dict) -> dict:
    """Shard attributes hold scalars: nested settings (the source stores' fingerprints) as JSON."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in fingerprint.items()}
