"""`pipeline search` latency: one text query's top 10 over N synthetic 512-d fused embeddings, exact and FAISS.

The candidates are written as a run's fused store (`fuse.encode.write_fused`, one HDF5 shard per kind) and
searched the way `pipeline search` does after the query is embedded (`search.exact.top_k` over the store's
blocks; `search.faiss_index.cached_index` then `search`), so the figures exclude loading the backbones and
embedding the query (which depend on the backbones, not on N). Synthetic data: unit vectors drawn around
--clusters random centres (spread --noise); the queries are fresh draws from the same centres. Uniform random
vectors (--clusters 0) are the hardest case for an IVF index: nothing clusters.

Timed per size: exact search with the whole store in one block (the default --memory-gb on this machine) and with
--memory-gb 0.5, median of --queries single queries (page cache warm: the store was just written); the FAISS
build (k-means, filling, choosing nprobe by measured recall); opening the cached index (memory-mapped) and one
query, median of --queries; and the index's recall@10 on those queries against exact search.

    PYTHONPATH=. python bench/search.py --sizes 100000 1000000
    PYTHONPATH=. python bench/search.py --sizes 100000 --clusters 0
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.store import FeatureStore  # noqa: E402
from fuse.encode import write_fused  # noqa: E402
from search import exact, faiss_index  # noqa: E402


def synthetic(n: int, dim: int, clusters: int, noise: float, seed: int, centres_seed: int = 0) -> np.ndarray:
    """n unit vectors: around ``clusters`` centres (the same ones for every seed), or uniform when 0."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    centres = np.random.default_rng(centres_seed).standard_normal((max(clusters, 1), dim)).astype(np.float32)
    for a in range(0, n, 100_000):  # in blocks: float64 temporaries of 1M x 512 would take 4 GB
        m = min(100_000, n - a)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        x = centres[rng.integers(clusters, size=m)] + noise * x if clusters else x
        out[a:a + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(n: int, args, folder: Path) -> dict:
    images = synthetic(n, args.dim, args.clusters, args.noise, seed=1)
    queries = synthetic(max(args.queries, faiss_index.SAMPLE_QUERIES), args.dim, args.clusters, args.noise, seed=2)
    root = folder / f"fused-{n}"
    t0 = time.perf_counter()
    write_fused(root, np.arange(n), torch.from_numpy(images), torch.from_numpy(queries),
                {"backbone": "hada", "bench": n})
    t_write = time.perf_counter() - t0
    del images
    store = FeatureStore(root)
    row = {"n": n, "dim": args.dim, "write_s": round(t_write, 1)}
    sample = queries[:args.queries]
    for label, memory_gb in (("exact_one_block", 1e9), ("exact_0.5GB", 0.5)):
        block = exact.rows_per_block(args.dim, 1, memory_gb)
        times, found = [], []
        for q in sample:
            t, (_, rows) = timed(lambda q=q, b=block: exact.top_k(store.embed_blocks("images", b), q[None], 10))
            times.append(t)
            found.append(rows[0])
        row[f"{label}_s"] = round(statistics.median(times), 4)
    t_build, (_, info) = timed(lambda: faiss_index.cached_index(store, "images", "texts", folder / f"index-{n}",
                                                                memory_gb=4.0))
    row.update(faiss_build_s=round(t_build, 1), nlist=info["nlist"], nprobe=info["nprobe"],
               build_recall=info["recall"])
    times, hits = [], []
    for q, truth in zip(sample, found):
        def once(q=q):
            index, _ = faiss_index.cached_index(store, "images", "texts", folder / f"index-{n}", memory_gb=4.0)
            return faiss_index.search(index, q[None], 10)
        t, (_, rows) = timed(once)
        times.append(t)
        hits.append(len(np.intersect1d(rows[0], truth)) / 10)
    row.update(faiss_open_and_query_s=round(statistics.median(times), 4), faiss_recall10=round(float(np.mean(hits)), 3))
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000, help="0: uniform random unit vectors")
    ap.add_argument("--noise", type=float, default=0.8, help="spread around a centre (per dimension)")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where the synthetic stores go (default: a temporary folder)")
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} CPUs  "
          f"load avg {os.getloadavg()[0]:.2f}  clusters {args.clusters}  noise {args.noise}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [bench(n, args, Path(tmp)) for n in args.sizes]
    print("| candidates | exact, one block | exact, --memory-gb 0.5 | FAISS build | nlist / nprobe | "
          "FAISS open + query | recall@10 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['exact_one_block_s'] * 1e3:,.0f} ms | {r['exact_0.5GB_s'] * 1e3:,.0f} ms | "
              f"{r['faiss_build_s']:,.0f} s | {r['nlist']} / {r['nprobe']} | "
              f"{r['faiss_open_and_query_s'] * 1e3:,.1f} ms | {r['faiss_recall10']:.3f} |")
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
