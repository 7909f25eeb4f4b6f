"""A FAISS index of a run's fused embeddings, cached beside the run and keyed so that it is never stale.

Kind: IVF-Flat by inner product (the embeddings are unit rows: cosine). The vectors are kept whole, so the only
loss against exact search is which lists are probed; ``nprobe`` is chosen when the index is built, as the fewest
lists whose recall@10 against exact search, measured on sample queries (embeddings of the other side of the
split), reaches ``TARGET_RECALL``. The measured recall is recorded and reported.

Cache: ``<run>/index/<split>/<kind>-<key>.faiss`` plus a ``.json`` record. The key hashes the fused store's
fingerprint (checkpoint content, split index version, ...) and each of its shard files' name, size and
modification time, and this module's recipe version: re-encoded embeddings get a new key, and an index of older
ones is deleted when the new one is built. The file is read memory-mapped, so a query reads only the lists it
probes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from data.atomic import atomic_path, read_json, write_json
from data.errors import PipelineError
from data.progress import Progress
from data.store import FeatureStore, read_shard_attrs
from search.exact import rows_per_block, top_k

log = logging.getLogger("pipeline.search")
RECIPE = "ivf-flat-ip-v1"  # bump when the index would come out differently
TARGET_RECALL = 0.95
RECALL_K = 10
SAMPLE_QUERIES = 200
TRAIN_PER_LIST = 64  # k-means training points per list (FAISS warns below 39)


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise PipelineError("--index faiss needs the faiss-cpu package: pip install faiss-cpu") from None
    return faiss


def index_key(store: FeatureStore, kind: str) -> str:
    """What the index is made from: the store's fingerprint, its shard files as they are on disk, the recipe."""
    blob = json.dumps({"store": store.content_key(), "kind": kind, "recipe": RECIPE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lists_for(n: int) -> int:
    """IVF lists: about sqrt(n) (FAISS suggests 4-16 sqrt(n); fewer keep the k-means of a build within minutes on
    a few CPU cores, and the measured nprobe makes up for it), with at least TRAIN_PER_LIST training points each
    (1 list: a flat scan)."""
    return max(1, min(int(math.sqrt(n)), n // TRAIN_PER_LIST))


def count_rows(store: FeatureStore, kind: str) -> int:
    """Rows of one kind in a store without views (a fused store), from its shards' attributes."""
    return sum(int(read_shard_attrs(p)["rows"]) for p in store.shard_paths(kind))


def _sample_rows(store: FeatureStore, kind: str, n: int, block: int, seed: int) -> np.ndarray:
    """The embeddings of ``n`` rows drawn at random (without replacement) from one kind of the store."""
    total = count_rows(store, kind)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    out, seen = [], 0
    for _, embeds in store.embed_blocks(kind, block):
        here = picked[(picked >= seen) & (picked < seen + len(embeds))] - seen
        out.append(np.asarray(embeds[here], dtype=np.float32))
        seen += len(embeds)
    return np.concatenate(out) if out else np.zeros((0, store.dims(kind)[1]), np.float32)


def recall_at(index, queries: np.ndarray, exact_rows: list[np.ndarray], k: int) -> float:
    """Mean share of each query's exact top ``k`` that the index returns in its top ``k``."""
    _, found = index.search(queries, k)
    return float(np.mean([len(np.intersect1d(f, e)) / max(len(e), 1) for f, e in zip(found, exact_rows)]))


def build(store: FeatureStore, kind: str, queries_kind: str, memory_gb: float) -> tuple[object, dict]:
    """Train and fill the index from the store block by block, then choose nprobe by measured recall."""
    faiss = faiss_module()
    t0 = time.perf_counter()
    dim, n = store.dims(kind)[1], count_rows(store, kind)
    block = rows_per_block(dim, 1, memory_gb)
    nlist = lists_for(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    log.info("building a FAISS IVF%d,Flat index of %d %s", nlist, n, kind)
    index.train(_sample_rows(store, kind, nlist * TRAIN_PER_LIST, block, seed=0))
    with Progress(f"FAISS index of {kind}", n, unit="row", logger=log.name) as progress:
        for ids, embeds in store.embed_blocks(kind, block):
            index.add_with_ids(np.ascontiguousarray(embeds, dtype=np.float32), np.asarray(ids, dtype=np.int64))
            progress.update(len(ids))
    queries = _sample_rows(store, queries_kind, SAMPLE_QUERIES, block, seed=1)
    k = min(RECALL_K, n)
    _, exact_rows = top_k(store.embed_blocks(kind, rows_per_block(dim, len(queries), memory_gb)), queries, k, n,
                          desc="exact search for the recall check")
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        recall = recall_at(index, queries, exact_rows, k)
        if recall >= TARGET_RECALL or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    info = {"recipe": RECIPE, "kind": kind, "rows": n, "dim": dim, "nlist": nlist, "nprobe": nprobe,
            "recall_k": k, "recall": round(recall, 4), "recall_queries": len(queries), "queries_from": queries_kind,
            "seconds": round(time.perf_counter() - t0, 1)}
    return index, info


def cached_index(store: FeatureStore, kind: str, queries_kind: str, folder: Path,
                 memory_gb: float) -> tuple[object, dict]:
    """The index of one kind of a fused store: read from ``folder`` if one was built from exactly these
    embeddings, else built now (``info["built"]`` says which) and older indexes of that kind removed."""
    faiss = faiss_module()
    key = index_key(store, kind)
    path, record = folder / f"{kind}-{key}.faiss", folder / f"{kind}-{key}.json"
    if path.is_file() and record.is_file():
        info = read_json(record)
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        index.nprobe = info["nprobe"]
        return index, {**info, "path": str(path), "built": False}
    index, info = build(store, kind, queries_kind, memory_gb)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    write_json(record, info)  # last: an index without its record is rebuilt
    for old in folder.glob(f"{kind}-*"):
        if old.stem != path.stem:
            old.unlink()
    return index, {**info, "path": str(path), "built": True}


def search(index, queries: np.ndarray, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query, the index's top ``k`` (scores, ids); FAISS pads with id -1 when it finds fewer."""
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    keep = [i >= 0 for i in ids]
    return [s[m] for s, m in zip(scores, keep)], [i[m].astype(np.int64) for i, m in zip(ids, keep)]
