"""Stage two entry points: train a run, then write its fused embeddings of val and test for scoring."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

from data.device import pick_device
from data.discover import dataset_in_cache, fuse_backbones
from data.errors import PipelineError
from data.index import index_path
from data.store import FeatureStore, check_settings
from fuse import checkpoint
from fuse.config import FuseConfig
from fuse.data import memory_budget_gb, open_stores, present_images
from fuse.encode import encode_stores, eval_batch_size, store_fused
from fuse.model import learned_scalars, model_from_checkpoint
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


def check_run_stores(saved: dict, run: str, split: str, stores: list[FeatureStore]) -> None:
    """Refuse stores whose settings differ from those the run was trained on (recorded in its config.json)."""
    trained = saved.get("store_settings")
    if trained is None:  # runs made before the settings were recorded
        log.warning("run %s does not record the settings of the stores it was trained on (made by an older "
                    "version): the %s stores cannot be checked against them", run, split)
        return
    for name, store in zip(saved["backbones"], stores):
        check_settings(trained[name], store, name, split, f"run {run}'s")


def encode_run(run_dir: Path, split: str, cache: str | None = None, device: str = "auto",
               memory_gb: float | None = None) -> Path:
    """Encode a cached split through a run's best checkpoint into ``<run>/embeds/<split>/``.

    The split's stores must have the settings the run was trained on. Embeddings already there are reused only
    if they were made from the same checkpoint (its content hash), from stores of the same fingerprints and the
    same content (a store re-extracted in place is new), in the same cache folder. Encoding reads the stores block
    by block within ``memory_gb`` (default: 70% of the memory available), clean views only, holding the fused
    store's lock: a second process encoding the same split is refused before it starts.
    """
    run_dir = Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    cfg = FuseConfig.from_dict({**saved["config"], **({"cache": cache} if cache else {})})
    index, stores = open_stores(cfg.cache, cfg.dataset, split, saved["backbones"])
    check_run_stores(saved, run_dir.name, split, stores)
    best = run_dir / "best.pt"
    if not best.is_file():
        raise PipelineError(f"run {run_dir.name!r} has no best.pt yet: train it with `pipeline fuse`")
    fingerprint = {"backbone": "hada", "run": run_dir.name, "backbones": ",".join(saved["backbones"]),
                   "checkpoint_sha256": file_digest(best), "index_version": index.version,
                   "weighted": cfg.model.weighted, "cache": str(Path(cfg.cache).resolve()),
                   "stores": {name: {"fingerprint": store.manifest()["fingerprint"], "content": store.content_key()}
                              for name, store in zip(saved["backbones"], stores)}}
    fused = FeatureStore(fused_root(run_dir, split))
    if made_from(fused, fingerprint):
        return fused.root
    with fused.writing(f"it is encoding {split} through run {run_dir.name}: wait for it to finish, then rerun"):
        if made_from(fused, fingerprint):  # by the process that held the lock before
            return fused.root
        state = checkpoint.load(best)
        dev = pick_device(device)
        model = model_from_checkpoint(state, cfg, dev)
        present = present_images(stores, len(index.images))
        ids, images, texts = encode_stores(model, index, stores, dev, eval_batch_size(cfg),
                                           memory_budget_gb(memory_gb), present)
        store_fused(fused, ids, images, texts, fingerprint)
    log.info("fused embeddings of %s (epoch %d) written to %s", index.describe(), state["epoch"], fused.root)
    return fused.root


def made_from(fused: FeatureStore, fingerprint: dict) -> bool:
    """True when ``fused`` holds complete embeddings made from exactly ``fingerprint``."""
    if not fused.exists():
        return False
    manifest = fused.manifest()
    return bool(manifest.get("complete")) and manifest["fingerprint"] == fingerprint


def settle_targets(cfg: FuseConfig) -> FuseConfig:
    """Fill in what the command line left out: an omitted --dataset or --backbones is what the cache holds (see
    data/discover.py for the order rule); ``--resume`` without --run continues the run this command would start
    (its default name). A resumed run (with --run) or a second stage takes them from the saved run instead."""
    if cfg.init or (cfg.resume and cfg.run):
        return cfg
    try:
        dataset = dataset_in_cache(cfg.cache, cfg.dataset)
        cfg = replace(cfg, dataset=dataset, backbones=",".join(fuse_backbones(cfg.cache, dataset, cfg.backbones)))
    except PipelineError:
        if not cfg.resume:
            raise
        return resumable_run(cfg, None)
    return resumable_run(cfg, cfg.run_name) if cfg.resume else cfg


def resumable_run(cfg: FuseConfig, name: str | None) -> FuseConfig:
    """``cfg`` with --run ``name`` when that run can be resumed; else stop, naming the runs that could be meant."""
    if name and (Path(cfg.runs) / name / "last.pt").is_file():
        log.info("--resume: continuing run %s (the run this command would start)", name)
        return replace(cfg, run=name)
    runs = sorted(p.parent.name for p in Path(cfg.runs).glob("*/last.pt")
                  if cfg.dataset is None or checkpoint.read_config(p.parent)["config"].get("dataset") == cfg.dataset)
    meant = f"no run {name} in {cfg.runs} (the run this command would start)" if name else \
        f"the run this command would start cannot be named from the cache ({cfg.cache})"
    if runs:
        raise PipelineError(f"--resume: {meant}; runs that can be resumed: {', '.join(runs)}. Pass --run NAME")
    raise PipelineError(f"--resume: {meant}, and no run in {cfg.runs} can be resumed: leave --resume out to start one")


def run_fuse(cfg: FuseConfig, given: frozenset[str] | None = None) -> dict:
    summary = train(cfg, given)
    cfg = summary["config"]  # as settled by --resume / --init
    encoded = []
    for split in ("val", "test"):
        if not index_path(cfg.cache, cfg.dataset, split).is_file():
            log.info("no cached %s split: its fused embeddings will be made when it is scored", split)
            continue
        try:
            encode_run(Path(summary["run"]), split, cfg.cache, cfg.device, cfg.memory_gb)
            encoded.append(split)
        except PipelineError as e:  # e.g. test extracted for one backbone only: say so, keep the trained run
            log.warning("fused %s embeddings not written: %s", split, e)
    return {**summary, "encoded": encoded}
