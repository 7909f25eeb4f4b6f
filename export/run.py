"""`pipeline export`: a split's embeddings (a fusion run's, or one backbone's) in clip-retrieval's layout."""
from __future__ import annotations

from pathlib import Path

from data.atomic import write_json
from data.backbone_spec import store_name
from data.datasets import image_folder
from data.errors import PipelineError
from data.index import SplitIndex
from data.store import FeatureStore
from evaluate.score import run_backbones
from export.config import ExportConfig
from export.layout import existing_files, write_export
from fuse.data import open_stores
from fuse.run import encode_run


def source_store(cfg: ExportConfig) -> tuple[str, FeatureStore, SplitIndex, FeatureStore]:
    """(what is exported, its store, the split index, the backbone store whose extraction named the images)."""
    if (cfg.run is None) == (cfg.backbone is None):
        raise PipelineError("pipeline export needs --run RUN (fused embeddings) or --backbone SPEC (one backbone's), "
                            "one of them")
    if cfg.run:
        backbones = run_backbones(cfg.runs, cfg.run, cfg.dataset)
        index, stores = open_stores(cfg.cache, cfg.dataset, cfg.split, backbones)
        root = encode_run(Path(cfg.runs) / cfg.run, cfg.split, cfg.cache, cfg.device)
        return f"run {cfg.run}", FeatureStore(root), index, stores[0]
    index, (store,) = open_stores(cfg.cache, cfg.dataset, cfg.split, [store_name(cfg.backbone)])
    return f"backbone {cfg.backbone}", store, index, store


def run_export(cfg: ExportConfig) -> dict:
    """Write the export; returns its summary (also written to ``<out>/export.json``, last)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out}: a file, not a folder")
    found = existing_files(out) + ([out / "export.json"] if (out / "export.json").exists() else [])
    if found and not cfg.overwrite:
        raise PipelineError(f"--out {out} already holds an export ({found[0]}): pass --overwrite to replace it, "
                            f"or choose another folder")
    what, store, index, extraction = source_store(cfg)
    folder = image_folder(extraction.manifest().get("config", {}))
    parts, images = write_export(out, store, index, folder, cfg.dtype, cfg.part_size, f"export {what} {cfg.split}")
    summary = {"source": what, "dataset": index.dataset, "split": index.split, "index_version": index.version,
               "images": images, "missing_images": len(index.images) - images,
               "dim": store.dims("images")[1], "dtype": cfg.dtype, "parts": parts, "metric": "inner product",
               "config": cfg.to_dict()}
    write_json(out / "export.json", summary)
    return {**summary, "out": str(out)}
