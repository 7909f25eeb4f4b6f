"""Stage two entry points: train a run, then write its fused embeddings of val and test for scoring."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from data.device import pick_device
from data.errors import PipelineError
from data.index import index_path
from data.store import FeatureStore
from fuse import checkpoint
from fuse.config import FuseConfig
from fuse.data import load_split_features, open_stores, place
from fuse.encode import encode_split, eval_batch_size, write_fused
from fuse.model import build_model, learned_scalars
from fuse.provenance import LABEL
from fuse.train import train

log = logging.getLogger("pipeline.fuse")


def fused_root(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / "embeds" / split


def file_digest(path: Path) -> str:
    """sha256 of a file's content (the identity of a checkpoint, whatever its modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run_summary(run_dir: Path) -> dict:
    """What a score table records about a run: its config, backbones, best epoch, and for a run imported onto
    features that differ from the reference's, how they differ (``provenance``, one line; else None)."""
    saved = checkpoint.read_config(Path(run_dir))
    best = checkpoint.load(Path(run_dir) / "best.pt", f"run {Path(run_dir).name!r}")
    learned = learned_scalars(best["model"], FuseConfig.from_dict(saved["config"]).model)
    caveats = saved.get("provenance")
    return {"name": Path(run_dir).name, "backbones": saved["backbones"], "config": saved["config"],
            "best_epoch": best["epoch"], "best_val_rsum": best["best_rsum"], "learned": learned,
            "provenance": f"{LABEL}: " + "; ".join(caveats) if caveats else None}


def encode_run(run_dir: Path, split: str, cache: str | None = None, device: str = "auto") -> Path:
    """Encode a cached split through a run's best checkpoint into ``<run>/embeds/<split>/``.

    Embeddings already there are reused only if they were made from the same checkpoint (its content hash)
    and the same split index.
    """
    run_dir = Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    cfg = FuseConfig.from_dict({**saved["config"], **({"cache": cache} if cache else {})})
    index, stores = open_stores(cfg.cache, cfg.dataset, split, saved["backbones"])
    best = run_dir / "best.pt"
    if not best.is_file():
        raise PipelineError(f"run {run_dir.name!r} has no best.pt yet: train it with `pipeline fuse`")
    fingerprint = {"backbone": "hada", "run": run_dir.name, "backbones": ",".join(saved["backbones"]),
                   "checkpoint_sha256": file_digest(best), "index_version": index.version,
                   "weighted": cfg.model.weighted}
    root = fused_root(run_dir, split)
    store = FeatureStore(root)
    if store.exists() and store.manifest().get("complete") and store.manifest()["fingerprint"] == fingerprint:
        return root
    state = checkpoint.load(best)
    dev = pick_device(device)
    model = build_model(state["dims"], cfg).to(dev)
    model.load_state_dict(state["model"])
    features = place(load_split_features(index, stores, views=False), dev)
    ids, images, texts = encode_split(model, features, dev, eval_batch_size(cfg))
    write_fused(root, ids, images, texts, fingerprint)
    log.info("fused embeddings of %s (epoch %d) written to %s", index.describe(), state["epoch"], root)
    return root


def run_fuse(cfg: FuseConfig, given: frozenset[str] | None = None) -> dict:
    summary = train(cfg, given)
    cfg = summary["config"]  # as settled by --resume / --init
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
