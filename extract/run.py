"""Stage one: plan the shards of a split, dispatch them (dask), and write the manifest and summary."""
from __future__ import annotations

import json
import logging
import threading
import time

from tqdm import tqdm

from data.datasets import load_split, resolve
from data.errors import PipelineError
from data.index import store_index
from data.store import FeatureStore, read_shard_attrs, sample_bytes, shard_is_complete
from extract.config import ExtractConfig
from extract.shard import PRECISIONS, ShardJob, load_backbone, pick_device, run_shard

log = logging.getLogger("pipeline.extract")
VERSION_KEYS = ("transformers", "open_clip", "torch")
AUGMENTATION = "hada-lavis-v1"  # extract.augment's recipe; bump when views would come out differently  # recorded in shards, but not a reason to refuse a store


class Progress:
    """One bar over all rows of a run, with images/s and captions/s (thread-safe for the threads scheduler)."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, unit="row", desc="extract", dynamic_ncols=True)
        self.counts = {"images": 0, "texts": 0}
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()

    def update(self, kind: str, n: int) -> None:
        with self.lock:
            self.counts[kind] += n
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(images_s=f"{self.counts['images'] / dt:.1f}", captions_s=f"{self.counts['texts'] / dt:.1f}")
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def check_config(cfg: ExtractConfig) -> None:
    if cfg.views and cfg.split != "train":
        raise PipelineError(f"--views {cfg.views}: augmented views are for the train split only, not {cfg.split!r}")
    if cfg.precision not in PRECISIONS:
        raise PipelineError(f"--precision {cfg.precision!r}: choose fp32, fp16 or bf16")
    device = pick_device(cfg.device)  # refuses cuda where there is none
    if cfg.precision == "fp16" and device.type == "cpu":
        raise PipelineError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if cfg.scheduler == "distributed" and not cfg.address:
        raise PipelineError("--scheduler distributed needs --address tcp://HOST:PORT of a running dask scheduler")
    for name in ("batch_size", "shard_size", "token_pool"):
        if getattr(cfg, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")


def plan(n_images: int, n_texts: int, shard_size: int) -> list[ShardJob]:
    jobs = []
    for kind, n in (("images", n_images), ("texts", n_texts)):
        jobs += [ShardJob(kind, k, s, min(s + shard_size, n)) for k, s in enumerate(range(0, n, shard_size))]
    return jobs


def fingerprint(cfg: ExtractConfig, backbone, index_version: str) -> dict:
    """Everything that changes the stored features: a store made with a different one is refused."""
    desc = {k: v for k, v in backbone.describe().items() if k not in VERSION_KEYS}
    return {**desc, "precision": cfg.precision, "token_pool": cfg.token_pool, "views": cfg.views,
            "view_seed": cfg.seed if cfg.views else 0,
            "augmentation": AUGMENTATION if cfg.views else "", "index_version": index_version}


def estimate_bytes(backbone, cfg: ExtractConfig, index) -> dict:
    """Disk estimate from the node counts and widths (float16 tokens, float32 embeddings, int64 ids/offsets)."""
    d = backbone.describe()
    per_image = sample_bytes(backbone.image_rows(cfg.token_pool), d["image_token_dim"], d["embed_dim"],
                             backbone.queries_per_image)
    text_rows = float(backbone.tokenize(list(index.captions[:512])).node_rows.float().mean())
    per_text = sample_bytes(text_rows, d["text_token_dim"], d["embed_dim"])
    n_img = len(index.images) * (1 + cfg.views)
    return {"bytes_per_image": int(per_image), "bytes_per_caption": int(per_text),
            "images": int(per_image * n_img), "texts": int(per_text * len(index.captions)),
            "total": int(per_image * n_img + per_text * len(index.captions))}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def dispatch(jobs, cfg, index, image_root, attrs, progress):
    """Run shard jobs as dask tasks: in this process (sync, threads) or on an existing distributed cluster."""
    import dask

    tasks = [dask.delayed(run_shard, pure=False)(job, cfg, index, image_root, attrs, progress) for job in jobs]
    if cfg.scheduler in ("sync", "threads"):
        return list(dask.compute(*tasks, scheduler=cfg.scheduler))
    if cfg.scheduler == "distributed":  # progress is None here: workers report per shard instead
        from distributed import Client

        with Client(cfg.address) as client:
            return [f.result() for f in tqdm(client.compute(tasks), desc="shards", unit="shard")]
    raise PipelineError(f"--scheduler {cfg.scheduler!r}: choose sync, threads or distributed")


def run_extract(cfg: ExtractConfig) -> dict:
    """Extract one backbone over one split into the feature store; returns the run summary."""
    check_config(cfg)
    spec = resolve(cfg.dataset, cfg.data_root, cfg.annotations, cfg.images)
    index = load_split(spec, cfg.split)
    log.info("split %s (index version %s)", index.describe(), index.version)
    backbone = load_backbone(cfg, pick_device(cfg.device))  # resolves weights first: fails fast, before any work
    estimate = estimate_bytes(backbone, cfg, index)
    store = FeatureStore.at(cfg.cache, index.dataset, index.split, cfg.store)
    jobs = plan(len(index.images), len(index.captions), cfg.shard_size)
    if cfg.dry_run:
        return {"dry_run": True, "store": str(store.root), "shards": len(jobs), "estimate": estimate,
                "rows": {"images": len(index.images) * (1 + cfg.views), "texts": len(index.captions)}}

    store_index(index, cfg.cache)
    fp = fingerprint(cfg, backbone, index.version)
    manifest = store.claim(fp)
    attrs = {**fp, **{k: v for k, v in backbone.describe().items() if k in VERSION_KEYS}}
    todo = [j for j in jobs if not shard_is_complete(store.root / j.name, {"index_version": index.version,
                                                                            "start": j.start, "stop": j.stop})]
    log.info("%s: %d of %d shards to do, estimated %s on disk", store.root, len(todo), len(jobs), human(estimate["total"]))
    t0 = time.perf_counter()
    local = cfg.scheduler in ("sync", "threads")
    progress = Progress(sum((j.stop - j.start) * (1 + cfg.views if j.kind == "images" else 1) for j in todo)) if local else None
    try:
        results = dispatch(todo, cfg, index, spec.image_root, attrs, progress)
    finally:
        if progress:
            progress.close()
    written = [read_shard_attrs(store.root / j.name) for j in jobs if (store.root / j.name).is_file()]
    # Every bad image of the run is named at once; shards holding one were not written (unless --skip-bad).
    bad = sorted({(i, e) for r in results for i, e in r.bad}
                 | {(i, e) for a in written for i, e in json.loads(a.get("bad_images", "[]"))})
    if bad and not cfg.skip_bad:
        raise PipelineError(bad_images_message(bad))
    manifest.update(
        shards={kind: [j.name for j in jobs if j.kind == kind] for kind in ("images", "texts")},
        bad_images=[{"id": i, "error": e} for i, e in bad],
        truncated_captions=sum(int(a.get("truncated", 0)) for a in written if a.get("kind") == "texts"),
        config=cfg.to_dict())
    store.finish(manifest)
    sizes = {p.name: p.stat().st_size for p in store.root.glob("*.h5")}
    return {"store": str(store.root), "shards": len(jobs), "shards_written": sum(r.written for r in results),
            "rows": {"images": len(index.images) * (1 + cfg.views) - len(bad) * (1 + cfg.views),
                     "texts": len(index.captions)},
            "bytes": sum(sizes.values()), "seconds": round(time.perf_counter() - t0, 2),
            "bad_images": len(bad), "truncated_captions": manifest["truncated_captions"], "estimate": estimate}


def bad_images_message(bad: list[tuple[int, str]]) -> str:
    lines = "\n  ".join(e for _, e in bad)
    return (f"{len(bad)} image(s) could not be read:\n  {lines}\n"
            f"Fix or remove them, or pass --skip-bad to exclude them (recorded in the manifest).")
