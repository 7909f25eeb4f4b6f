"""Stage two entry points: train a run, then write its fused embeddings of val and test for scoring."""
from __future__ import annotations

import logging
from pathlib import Path

from data.errors import PipelineError
from data.index import index_path
from data.store import FeatureStore
from fuse import checkpoint
from fuse.config import FuseConfig
from fuse.data import load_split_features, open_stores
from fuse.encode import encode_split, write_fused
from fuse.train import build_model, pick_device, place, train

log = logging.getLogger("pipeline.fuse")


def fused_root(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / "embeds" / split


def encode_run(run_dir: Path, split: str, cache: str | None = None, device: str = "auto") -> Path:
    """Encode a cached split through a run's best checkpoint into ``<run>/embeds/<split>/`` (skipped if current)."""
    run_dir = Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    cfg = FuseConfig(**{**saved["config"], **({"cache": cache} if cache else {})})
    index, stores = open_stores(cfg.cache, cfg.dataset, split, saved["backbones"])
    best = run_dir / "best.pt"
    fingerprint = {"backbone": "hada", "run": run_dir.name, "backbones": ",".join(saved["backbones"]),
                   "checkpoint_mtime_ns": best.stat().st_mtime_ns if best.exists() else 0,
                   "index_version": index.version, "weighted": cfg.weighted}
    root = fused_root(run_dir, split)
    store = FeatureStore(root)
    if store.exists() and store.manifest().get("complete") and store.manifest()["fingerprint"] == fingerprint:
        return root
    state = checkpoint.load(best)
    dev = pick_device(device)
    model = build_model(state["dims"], cfg).to(dev)
    model.load_state_dict(state["model"])
    features = place(load_split_features(index, stores, views=False), dev)
    ids, images, texts = encode_split(model, features, dev)
    write_fused(root, ids, images, texts, fingerprint)
    log.info("fused embeddings of %s written to %s", index.describe(), root)
    return root


def run_fuse(cfg: FuseConfig) -> dict:
    summary = train(cfg)
    encoded = []
    for split in ("val", "test"):
        if not index_path(cfg.cache, cfg.dataset, split).is_file():
            log.info("no cached %s split: its fused embeddings will be made when it is scored", split)
            continue
        try:
            encode_run(Path(summary["run"]), split, cfg.cache, cfg.device)
            encoded.append(split)
        except PipelineError as e:  # e.g. test extracted for one backbone only: say so, keep the trained run
            log.warning("fused %s embeddings not written: %s", split, e)
    return {**summary, "encoded": encoded}
