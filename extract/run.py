"""Stage one: the stores to extract (backbones x splits), each one's shards, and their dispatch (dask)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from data.datasets import load_split, load_splits, resolve
from data.device import pick_device
from data.discover import dataset_in_data_root
from data.errors import PipelineError
from data.index import SplitIndex, store_index
from data.progress import Progress
from data.store import FeatureStore, read_shard_attrs, sample_bytes, shard_is_complete
from extract.backbones import check, load
from extract.config import DEFAULT_SHARD_SIZE, ExtractConfig
from extract.shard import ShardJob, run_shard

log = logging.getLogger("pipeline.extract")
VERSION_KEYS = ("transformers", "open_clip", "torch")  # recorded in shards, but not a reason to refuse a store
AUGMENTATION = "hada-lavis-v1"  # extract.augment's recipe; bump when views would come out differently


def check_config(cfg: ExtractConfig) -> None:
    """Refuse combinations that cannot work, before any work."""
    if cfg.views and cfg.split not in (None, "train"):
        raise PipelineError(f"--views {cfg.views}: augmented views are for the train split only, not {cfg.split!r}")
    device = pick_device(cfg.device)  # refuses cuda where there is none
    if cfg.precision == "fp16" and device.type == "cpu":
        raise PipelineError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if cfg.scheduler == "distributed" and not cfg.address:
        raise PipelineError("--scheduler distributed needs --address tcp://HOST:PORT of a running dask scheduler")
    if cfg.address and cfg.scheduler != "distributed":
        raise PipelineError(f"--address {cfg.address} is for --scheduler distributed (now --scheduler "
                            f"{cfg.scheduler}): add --scheduler distributed, or leave --address out")
    for flag, value in (("--annotations", cfg.annotations), ("--webdataset", cfg.webdataset)):
        if value and not cfg.dataset:
            raise PipelineError(f"{flag} needs --dataset NAME (the name of its folder in the cache)")


def plan_runs(cfg: ExtractConfig) -> list[tuple[ExtractConfig, SplitIndex]]:
    """One (config, split index) per backbone and split, backbone by backbone; names and dataset checked first.

    Without --dataset: the one dataset under --data-root. Without --split: every split the dataset
    defines, in the order train, val, test (--views applies to train only).
    """
    names = list(dict.fromkeys(cfg.backbone_list))
    if not names:
        raise PipelineError(f"--backbone {cfg.backbone!r}: name one or more backbones, comma-separated "
                            f"(see `pipeline backbones`)")
    for flag, value in (("--checkpoint", cfg.checkpoint), ("--model", cfg.model)):
        if value and len(names) > 1:
            raise PipelineError(f"{flag} {value!r} would apply to every one of {', '.join(names)}: extract them one "
                                f"at a time, or name each one's weights in its spec (e.g. blip@FOLDER)")
    families = {name: check(name, cfg.model)[1] for name in names}
    takers = [name for name, family in families.items() if family.processor]
    if cfg.processor and len(takers) != 1:
        raise PipelineError(f"--processor {cfg.processor!r} would apply to each of {', '.join(takers)}: extract "
                            f"them one at a time" if takers else f"--processor applies to blip and albef (weights "
                            f"that hold no tokenizer), not to {', '.join(names)}")
    check_config(cfg)
    if cfg.captions_per_image and cfg.split == "train":  # (run_extract is then called once per split: not there)
        raise PipelineError(f"--captions-per-image {cfg.captions_per_image} applies to the scored splits (val, test, "
                            f"all): the train split keeps every caption, as the reference trains")
    dataset = dataset_in_data_root(cfg.data_root, cfg.dataset)
    spec = resolve(dataset, cfg.data_root, cfg.annotations, cfg.images, cfg.webdataset, cfg.reading())
    check_image_root(spec, cfg)
    indexes = load_splits(spec, [cfg.split] if cfg.split else None, cfg.captions_per_image)
    return [(replace(cfg, backbone=name, dataset=dataset, split=split, views=cfg.views if split == "train" else 0),
             index) for name in names for split, index in indexes.items()]


def check_image_root(spec, cfg: ExtractConfig) -> None:
    """Refuse an image folder that does not exist, before anything is written (None: images in the collection)."""
    if spec.image_root is not None and not spec.image_root.is_dir():
        raise PipelineError(f"--images {cfg.images}: no such folder" if cfg.images else
                            f"{spec.image_root}: no such folder (the images of --dataset {spec.name} under "
                            f"--data-root {cfg.data_root})")


def shard_size(cfg: ExtractConfig, store: FeatureStore, manifest: dict | None, n_images: int, n_texts: int) -> int:
    """The shard size to cut with: a store keeps the one it was made with; another --shard-size is refused.

    Stores made before the manifest recorded it have it in their finished config, else it is read off their
    shards (``start // number``, or a first shard's rows when it is not the last); a store with no shard yet
    takes any size. ``manifest``: the store's (None when there is no store yet).
    """
    stored = None
    if manifest is not None and any(store.root.glob("*-*.h5")):
        stored = manifest.get("shard_size") or manifest.get("config", {}).get("shard_size")
        if stored is None:
            stored = shards_cut_with(store, cfg.shard_size or DEFAULT_SHARD_SIZE, n_images, n_texts)
    if stored is None or cfg.shard_size == stored:
        return cfg.shard_size or DEFAULT_SHARD_SIZE
    if cfg.shard_size is not None:
        raise PipelineError(f"--shard-size {cfg.shard_size}: the store at {store.root} was made with --shard-size "
                            f"{stored}; leave --shard-size out to continue it, or use another --cache")
    if stored != DEFAULT_SHARD_SIZE:
        log.info("%s was made with --shard-size %d: continuing with it", store.root, stored)
    return stored


def shards_cut_with(store: FeatureStore, size: int, n_images: int, n_texts: int) -> int | None:
    """None if every shard in the store is one that ``size`` cuts; else the size one of them was cut with."""
    jobs = {j.name: (j.start, j.stop) for j in plan(n_images, n_texts, size)}
    rows = {"images": n_images, "texts": n_texts}
    for path in sorted(store.root.glob("*-*.h5"), key=lambda p: -int(p.stem.rsplit("-", 1)[1])):
        try:
            attrs = read_shard_attrs(path)
            kind, number = path.stem.rsplit("-", 1)
            start, stop, number = int(attrs["start"]), int(attrs["stop"]), int(number)
        except (OSError, KeyError, ValueError):
            continue  # unreadable: redone whatever the size
        if jobs.get(path.name) == (start, stop):
            continue
        if number:
            return start // number
        if stop < rows.get(kind, stop + 1):  # a first shard that is not also the last one is a whole shard
            return stop - start
        # a kind held in one shard fits any size at least that large: nothing to learn from it
    return None


def check_backbone_options(cfg: ExtractConfig, backbone) -> None:
    """Refuse options the loaded backbone would ignore (and that would still enter the store's settings)."""
    if cfg.token_pool > 1 and not backbone.patch_grid:
        raise PipelineError(f"--token-pool {cfg.token_pool}: {cfg.backbone} stores no patch-token grid to pool "
                            f"(its image nodes: {backbone.image_rows()} per image); leave --token-pool out")


def reusable(path: Path, fp: dict, job: ShardJob) -> bool:
    """A shard is kept when it is complete, made with every setting of this run, and excludes no image: a shard
    written under --skip-bad is redone on every run, so a repaired image is re-read (and a still-bad one is
    named again)."""
    if not shard_is_complete(path, {**fp, "start": job.start, "stop": job.stop}):
        return False
    return job.kind != "images" or not json.loads(read_shard_attrs(path).get("bad_images", "[]"))


def plan(n_images: int, n_texts: int, shard_size: int) -> list[ShardJob]:
    jobs = []
    for kind, n in (("images", n_images), ("texts", n_texts)):
        jobs += [ShardJob(kind, k, s, min(s + shard_size, n)) for k, s in enumerate(range(0, n, shard_size))]
    return jobs


def fingerprint(cfg: ExtractConfig, backbone, index_version: str) -> dict:
    """Everything that changes the stored features: a store made with a different one is refused."""
    desc = {k: v for k, v in backbone.describe().items() if k not in VERSION_KEYS}
    # Only stores with views record their augmentation, so stores without views made before it was added still match.
    views = {"views": cfg.views, "view_seed": cfg.seed if cfg.views else 0,
             **({"augmentation": AUGMENTATION} if cfg.views else {})}
    return {**desc, "precision": cfg.precision, "token_pool": cfg.token_pool, **views, "index_version": index_version}


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


def dispatch(jobs, cfg: ExtractConfig, index, images, attrs: dict) -> list:
    """Run shard jobs as dask tasks: in this process (sync, threads) or on an existing distributed cluster.

    ``images``: the split's image source (data/image_source.py).
    """
    import dask

    desc = f"{cfg.backbone} {cfg.split}"
    if cfg.scheduler in ("sync", "threads"):
        rows = sum((j.stop - j.start) * (1 + cfg.views if j.kind == "images" else 1) for j in jobs)
        with Progress(desc, rows, unit="row", logger=log.name) as progress:
            tasks = [dask.delayed(run_shard, pure=False)(job, cfg, index, images, attrs, progress) for job in jobs]
            return list(dask.compute(*tasks, scheduler=cfg.scheduler))
    from distributed import Client, as_completed

    # Workers may run in other folders: give them absolute paths (the filesystem is shared).
    cfg = replace(cfg, cache=str(Path(cfg.cache).resolve()))
    tasks = [dask.delayed(run_shard, pure=False)(job, cfg, index, images.resolve(), attrs) for job in jobs]
    try:
        client = Client(cfg.address, timeout=20)
    except (OSError, TimeoutError, ValueError) as e:
        raise PipelineError(f"--address {cfg.address}: no dask scheduler answers there ({e})") from None
    with client, Progress(desc, len(tasks), unit="shard", logger=log.name) as progress:
        futures = client.compute(tasks)
        for _ in as_completed(futures):
            progress.update(1)
        return [f.result() for f in futures]


def run_extract(cfg: ExtractConfig, index: SplitIndex | None = None) -> dict:
    """Extract one backbone over one split (``index``, read here if None) into its store; returns the summary."""
    check_config(cfg)
    spec = resolve(cfg.dataset, cfg.data_root, cfg.annotations, cfg.images, cfg.webdataset, cfg.reading())
    check_image_root(spec, cfg)
    index = index if index is not None else load_split(spec, cfg.split, cfg.captions_per_image)
    images = index.source
    log.info("split %s (index version %s)", index.describe(), index.version)
    backbone = load(cfg.backbone, cfg.backbone_options(), pick_device(cfg.device))  # weights first: fails fast
    check_backbone_options(cfg, backbone)
    estimate = estimate_bytes(backbone, cfg, index)
    store = FeatureStore.at(cfg.cache, index.dataset, index.split, cfg.store)
    fp = fingerprint(cfg, backbone, index.version)
    manifest = store.check(fp)  # another configuration is the first thing to say about an existing store
    cfg = replace(cfg, shard_size=shard_size(cfg, store, manifest, len(index.images), len(index.captions)))
    jobs = plan(len(index.images), len(index.captions), cfg.shard_size)
    if cfg.dry_run:
        return {"dry_run": True, "store": str(store.root), "shards": len(jobs), "estimate": estimate,
                "rows": {"images": len(index.images) * (1 + cfg.views), "texts": len(index.captions)}}

    store_index(index, cfg.cache)
    with store.writing():  # one writer per store, for the whole write
        return write_store(cfg, index, images, backbone, store, fp, estimate)


def write_store(cfg: ExtractConfig, index: SplitIndex, images, backbone, store: FeatureStore, fp: dict,
                estimate: dict) -> dict:
    """Claim the store (its lock held), run the shards that cannot be reused, and finish its manifest."""
    # The shard size is settled again under the lock: another writer may have started the store meanwhile.
    cfg = replace(cfg, shard_size=shard_size(cfg, store, store.check(fp), len(index.images), len(index.captions)))
    jobs = plan(len(index.images), len(index.captions), cfg.shard_size)
    manifest = store.claim(fp, cfg.shard_size, spec=cfg.backbone)
    attrs = {**fp, **{k: v for k, v in backbone.describe().items() if k in VERSION_KEYS}}
    todo = [j for j in jobs if not reusable(store.root / j.name, fp, j)]
    log.info("%s: %d of %d shards to do, estimated %s on disk", store.root, len(todo), len(jobs),
             human(estimate["total"]))
    t0 = time.perf_counter()
    results = dispatch(todo, cfg, index, images, attrs)
    # What the store holds now: shards kept from before, and those written by this run (a redone shard that was
    # not written leaves an old file whose excluded images say nothing about this run).
    now = [j for j in jobs if j not in todo] + [r.job for r in results if r.written]
    written = [read_shard_attrs(store.root / j.name) for j in now]
    # Every bad image of the run is named at once; shards holding one were not written (unless --skip-bad).
    bad = sorted({(i, e) for r in results for i, e in r.bad}
                 | {(i, e) for a in written for i, e in json.loads(a.get("bad_images", "[]"))})
    if index.images and len({i for i, _ in bad}) == len(index.images):
        for j in jobs:  # image shards of no rows (--skip-bad): not kept, so a rerun with the right folder redoes them
            if j.kind == "images":
                (store.root / j.name).unlink(missing_ok=True)
        raise PipelineError(f"all {len(index.images)} images of {index.dataset}/{index.split} are unreadable "
                            f"(the first: {bad[0][1]}): {images.hint()}")
    if bad and not cfg.skip_bad:
        raise PipelineError(bad_images_message(bad))
    manifest.update(
        shards={kind: [j.name for j in jobs if j.kind == kind] for kind in ("images", "texts")},
        bad_images=[{"id": i, "error": e} for i, e in bad],
        truncated_captions=sum(int(a.get("truncated", 0)) for a in written if a.get("kind") == "texts"),
        shard_size=cfg.shard_size, config=cfg.to_dict())
    store.finish(manifest)
    sizes = {j.name: (store.root / j.name).stat().st_size for j in jobs if (store.root / j.name).is_file()}
    return {"store": str(store.root), "shards": len(jobs), "shards_written": sum(r.written for r in results),
            "rows": {"images": len(index.images) * (1 + cfg.views) - len(bad) * (1 + cfg.views),
                     "texts": len(index.captions)},
            "bytes": sum(sizes.values()), "seconds": round(time.perf_counter() - t0, 2),
            "bad_images": len(bad), "truncated_captions": manifest["truncated_captions"], "estimate": estimate}


def bad_images_message(bad: list[tuple[int, str]]) -> str:
    lines = "\n  ".join(e for _, e in bad)
    return (f"{len(bad)} image(s) could not be read:\n  {lines}\n"
            f"Fix or remove them, or pass --skip-bad to exclude them (recorded in the manifest).")
