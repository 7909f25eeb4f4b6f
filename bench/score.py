"""Benchmark of the recall metric: COCO-5k-test shape against a per-query argsort loop; --big: blockwise scoring."""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate.recall import retrieval_recall, retrieval_recall_from_embeddings  # noqa: E402


def coco_shape(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """5,000 images x 25,010 captions (5 per image, 10 images with 6), with signal so ranks spread."""
    t2i = np.sort(np.concatenate([np.repeat(np.arange(5000), 5), np.arange(10)]))
    gen = torch.Generator().manual_seed(seed)
    sims = 0.1 * torch.randn(5000, t2i.size, generator=gen)
    sims[torch.from_numpy(t2i), torch.arange(t2i.size)] += 0.25
    return sims.numpy(), t2i


def loop_recall(sims: np.ndarray, t2i: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """The reference codes' way: argsort every query's row (and column) in a Python loop."""
    caps = [[] for _ in range(sims.shape[0])]
    for j, i in enumerate(t2i):
        caps[i].append(j)
    i2t = np.empty(sims.shape[0], dtype=np.int64)
    for i, row in enumerate(sims):
        order = np.argsort(row)[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in caps[i])
    t2i_ranks = np.empty(sims.shape[1], dtype=np.int64)
    for j, col in enumerate(np.ascontiguousarray(sims.T)):  # contiguous, as a text x image matrix would be
        t2i_ranks[j] = np.where(np.argsort(col)[::-1] == t2i[j])[0][0]
    out = {f"i2t_r{k}": 100.0 * np.mean(i2t < k) for k in ks}
    out.update({f"t2i_r{k}": 100.0 * np.mean(t2i_ranks < k) for k in ks})
    return out


def bench_coco(repeats: int) -> None:
    sims, t2i = coco_shape()
    times, got = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = retrieval_recall(sims, t2i)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = loop_recall(sims, t2i)
    t_loop = time.perf_counter() - t0
    agree = all(abs(got[k] - v) < 1e-9 for k, v in ref.items())  # continuous scores: no ties, same recall
    med = statistics.median(times)
    print(f"coco-5k shape {sims.shape[0]} x {sims.shape[1]} float32: retrieval_recall median {med:.3f} s "
          f"(min {min(times):.3f}, {repeats} runs); argsort loop {t_loop:.2f} s; ratio {t_loop / med:.1f}x; "
          f"recalls agree: {agree}; rsum {got['rsum']:.2f}")


def write_embeddings(path: Path, n_img: int, n_txt: int, dim: int, dtype: str, block: int = 8192) -> None:
    """Unit image embeddings and captions = noisy copies (n_txt // n_img per image), written block by block."""
    import h5py

    per = n_txt // n_img
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        img_ds = f.create_dataset("images", (n_img, dim), dtype=dtype)
        txt_ds = f.create_dataset("texts", (n_img * per, dim), dtype=dtype)
        for a in range(0, n_img, block):
            img = rng.standard_normal((min(block, n_img - a), dim), dtype=np.float32)
            img /= np.linalg.norm(img, axis=1, keepdims=True)
            txt = np.repeat(img, per, axis=0) + 3.5 / np.sqrt(dim) * rng.standard_normal(
                (img.shape[0] * per, dim), dtype=np.float32)
            txt /= np.linalg.norm(txt, axis=1, keepdims=True)
            img_ds[a:a + img.shape[0]] = img
            txt_ds[a * per:(a + img.shape[0]) * per] = txt


def computed_entries(n_img: int, n_txt: int, block_images: int = 4096, block_texts: int = 8192) -> int:
    """Similarity entries retrieval_ranks_from_embeddings computes: pass 1 (blocks holding positives) + pass 2."""
    t2i = np.repeat(np.arange(n_img), n_txt // n_img)
    pass1 = 0
    for c0 in range(0, t2i.size, block_texts):
        width = min(block_texts, t2i.size - c0)
        for r0 in np.unique(t2i[c0:c0 + width] // block_images) * block_images:
            pass1 += min(block_images, n_img - r0) * width
    return pass1 + n_img * t2i.size


def bench_big(scale: float, dtype: str, dim: int, workdir: str | None) -> None:
    """Score n_img x 5 n_img embeddings from HDF5 in this (fresh) process; peak RSS is this process's."""
    import h5py

    n_img, n_txt = int(round(100_000 * scale)), int(round(500_000 * scale))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "emb.h5"
        t0 = time.perf_counter()
        args = (path, n_img, n_txt, dim, dtype)
        gen = multiprocessing.get_context("spawn").Process(target=write_embeddings, args=args)
        gen.start()  # in another process, so that this one's peak RSS is the scoring's
        gen.join()
        if gen.exitcode:
            raise RuntimeError(f"generating the embeddings failed (exit code {gen.exitcode})")
        t_gen = time.perf_counter() - t0
        t2i = np.repeat(np.arange(n_img), n_txt // n_img)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        with h5py.File(path, "r") as f:
            t0 = time.perf_counter()
            got = retrieval_recall_from_embeddings(f["images"], f["texts"], t2i)
            t_score = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        size = path.stat().st_size / 2**30
    print(f"big: {n_img} x {t2i.size} x {dim} {dtype} in HDF5 ({size:.2f} GiB, generated in {t_gen:.1f} s): "
          f"scored in {t_score:.1f} s; peak RSS {peak:.2f} GiB (before scoring {rss_before:.2f} GiB); "
          f"rsum {got['rsum']:.2f}; load avg {os.getloadavg()[0]:.2f}")
    if scale != 1:
        # Time per computed entry (matmul dominates), scaled by the entries the full size computes.
        full = t_score * computed_entries(100_000, 500_000) / computed_entries(n_img, t2i.size)
        print(f"big: extrapolated to 100000 x 500000 x {dim}: ~{full:.0f} s ({full / 60:.1f} min)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of retrieval_recall")
    ap.add_argument("--big", action="store_true", help="also score 100k x 500k embeddings from HDF5, blockwise "
                    "(in a fresh process, so that its peak memory is its own)")
    ap.add_argument("--big-only", action="store_true", help="only the big benchmark, in this process")
    ap.add_argument("--big-scale", type=float, default=0.1, help="scale both counts (1 = full size)")
    ap.add_argument("--big-dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--big-dim", type=int, default=512)
    ap.add_argument("--workdir", default=None, help="folder for the temporary HDF5 file")
    args = ap.parse_args()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.machine()}  "
          f"nproc {len(os.sched_getaffinity(0))}  "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)  numpy {np.__version__}  "
          f"python {platform.python_version()}  load avg {os.getloadavg()[0]:.2f}")
    if args.big_only:
        bench_big(args.big_scale, args.big_dtype, args.big_dim, args.workdir)
        return
    if args.big:  # first: ru_maxrss survives exec, so the child must start before this process grows
        child = [sys.executable, __file__, "--big-only", "--big-scale", str(args.big_scale), "--big-dtype",
                 args.big_dtype, "--big-dim", str(args.big_dim)] + (["--workdir", args.workdir] if args.workdir else [])
        subprocess.run(child, check=True)
    bench_coco(args.repeats)


if __name__ == "__main__":
    main()
