"""What --coco-1k, --eccv, --qbnorm and --dbnorm add to `pipeline score` on a COCO-5K-shaped test split.

The split carries eccv_caption's real test ids (5,000 images, 25,000 captions) with random unit embeddings
(captions are noisy copies of their image's, so ranks spread). Per row of the table: the row itself (its ranks,
as `pipeline score` computes them), its COCO 1K row, its ECCV lists and the package's metrics; once per run:
matching a captions_val2014-sized file to the split and loading the package's positives. The bank passes of
QB-Norm and DBNorm are timed against a train bank scaled down from COCO's (113,287 images, 566,747 captions)
by --bank-scale, and their time per bank row extrapolated to the full bank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.coco_ids import read_coco_ids  # noqa: E402
from data.index import SplitIndex  # noqa: E402
from evaluate.bank_norm import ACTIVE_ALL, BETAS, bank_block_rows, bank_stats, tune_dbnorm, tune_qbnorm  # noqa: E402
from evaluate.eccv import EccvMetrics, load_metrics  # noqa: E402
from evaluate.protocols import Protocols  # noqa: E402
from evaluate.recall import retrieval_ranks, retrieval_ranks_from_embeddings  # noqa: E402
from evaluate.score import Embeddings  # noqa: E402
from evaluate.topk import top_k, top_k_from_embeddings  # noqa: E402

COCO_TRAIN = (113_287, 566_747)  # Karpathy train + restval images, their captions
VAL2014 = (40_504, 202_654)  # captions_val2014.json: images, annotations


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def coco_split(dim: int, seed: int = 0):
    """(split index, captions_val2014-shaped file contents, image embeddings, caption embeddings)."""
    metrics = load_metrics()
    order = list(dict.fromkeys(metrics.coco_gts["t2i"][int(c)][0] for c in metrics.coco_ids))
    samples = [(f"val2014/COCO_val2014_{i:012d}.jpg", [f"caption {c}" for c in metrics.coco_gts["i2t"][i]])
               for i in order]
    index = SplitIndex.from_samples("coco", "test", samples)
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in order]
    images += [{"id": 10 ** 7 + k, "file_name": f"filler_{k}.jpg"} for k in range(VAL2014[0] - len(order))]
    anns = [{"id": c, "image_id": i, "caption": f"caption {c}"} for i in order for c in metrics.coco_gts["i2t"][i]]
    filler = VAL2014[1] - len(anns)
    anns += [{"id": 10 ** 8 + k, "image_id": 10 ** 7 + k % (VAL2014[0] - len(order)), "caption": f"filler {k}"}
             for k in range(filler)]
    gen = torch.Generator().manual_seed(seed)
    img = unit(torch.randn(len(order), dim, generator=gen))
    t2i = torch.from_numpy(index.text_to_image)
    txt = unit(img[t2i] + 3.5 / dim ** 0.5 * torch.randn(len(t2i), dim, generator=gen))
    return index, {"images": images, "annotations": anns}, img, txt


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_protocols(dim: int) -> None:
    index, captions, img, txt = coco_split(dim)
    t2i = index.text_to_image
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions_val2014.json"
        path.write_text(json.dumps(captions))
        ids, t_ids = timed(read_coco_ids, path, index)
    eccv, t_load = timed(EccvMetrics, ids.images, ids.captions, "coco/test")
    print(f"once per run: matching a captions_val2014-sized file ({VAL2014[0]:,} images, {VAL2014[1]:,} captions) "
          f"{t_ids:.2f} s; loading eccv_caption's positives {t_load:.2f} s")

    emb = Embeddings("m", np.arange(len(index.images)), img, txt)
    _, t_row = timed(retrieval_ranks_from_embeddings, img, txt, t2i)
    protocols = Protocols(t2i, len(index.images), coco_1k=True)
    _, t_1k = timed(protocols.add, {"method": "m"}, emb.scores())
    lists, t_top = timed(top_k_from_embeddings, img, txt, eccv.i2t_length)
    metrics, t_pkg = timed(eccv, *lists)
    print(f"a row from embeddings ({len(index.images):,} x {len(t2i):,} x {dim}): its ranks {t_row:.2f} s; "
          f"+ COCO 1K {t_1k:.2f} s; + ECCV top-{eccv.k} lists {t_top:.2f} s and the package's metrics {t_pkg:.2f} s "
          f"(eccv_map_at_r t2i {metrics['eccv_map_at_r']['t2i']:.3f})")

    sims = img @ txt.T  # a row scored from a matrix (late fusion, +rerank, +qbnorm, +dbnorm, --sims)
    _, t_row = timed(retrieval_ranks, sims, t2i)
    _, t_i2t = timed(top_k, sims, eccv.i2t_length, "i2t")
    _, t_t2i = timed(top_k, sims, eccv.k, "t2i")
    print(f"a row from a matrix: its ranks {t_row:.2f} s; + ECCV lists {t_i2t + t_t2i:.2f} s "
          f"(the package's metrics as above)")


def bench_banks(dim: int, scale: float, memory_gb: float) -> None:
    """One bank pass of each kind (val gallery = test-sized), at every beta of the val grid and at one beta."""
    n_img, n_txt = (max(1, int(round(n * scale))) for n in COCO_TRAIN)
    gen = torch.Generator().manual_seed(1)
    bank_img, bank_txt = unit(torch.randn(n_img, dim, generator=gen)), unit(torch.randn(n_txt, dim, generator=gen))
    gallery_img, gallery_txt = unit(torch.randn(5000, dim, generator=gen)), unit(torch.randn(25000, dim, generator=gen))
    budget = int(memory_gb * 2 ** 30)
    total_val = total_test = 0.0
    stats = []
    passes = ((gallery_img, "5,000 images", bank_txt, "captions", COCO_TRAIN[1], ACTIVE_ALL),  # query banks, with
              (gallery_txt, "25,000 captions", bank_img, "images", COCO_TRAIN[0], ACTIVE_ALL),  # QB-Norm's sets
              (gallery_img, "5,000 images", bank_img, "images", COCO_TRAIN[0], None),  # DBNorm's gallery banks
              (gallery_txt, "25,000 captions", bank_txt, "captions", COCO_TRAIN[1], None))
    for gallery, g_name, bank, b_name, n_full, active in passes:
        block = bank_block_rows(budget, gallery.shape[0])
        got, t_all = timed(bank_stats, gallery, bank, BETAS, active, 1, block)
        stats.append(got)
        _, t_one = timed(bank_stats, gallery, bank, (20.0,), active, 1, block)
        full_all, full_one = t_all * n_full / bank.shape[0], t_one * n_full / bank.shape[0]
        total_val, total_test = total_val + full_all, total_test + full_one
        print(f"bank pass: {g_name} vs {bank.shape[0]:,} train {b_name} (block {block:,} rows): {len(BETAS)} betas "
              f"{t_all:.2f} s, one beta {t_one:.2f} s; extrapolated to {n_full:,} train {b_name}: "
              f"{full_all:.0f} s and {full_one:.0f} s")
    print(f"bank passes of one method with --qbnorm --dbnorm, extrapolated to COCO's train split: val (every beta) "
          f"~{total_val:.0f} s, test (one beta) ~{total_test:.0f} s; the first two passes alone are --qbnorm's")
    # Tuning on a val split of COCO's test shape: one ranking per beta (QB-Norm) or beta pair (DBNorm) and direction.
    sims = gallery_img @ gallery_txt.T
    t2i = np.repeat(np.arange(5000), 5)
    images_q, captions_q, images_g, captions_g = stats
    _, t_qb = timed(tune_qbnorm, sims, t2i, captions_q, images_q)
    _, t_db = timed(tune_dbnorm, sims, t2i, captions_q, captions_g, images_q, images_g)
    print(f"tuning on a 5,000 x 25,000 val split: QB-Norm ({len(BETAS)} betas x 2 directions) {t_qb:.1f} s, "
          f"DBNorm ({len(BETAS) ** 2} beta pairs x 2 directions) {t_db:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=256, help="embedding size")
    ap.add_argument("--bank-scale", type=float, default=0.02, help="train bank size as a fraction of COCO's")
    ap.add_argument("--memory-gb", type=float, default=2.0, help="bank pass budget")
    ap.add_argument("--no-banks", action="store_true", help="skip the bank passes")
    args = ap.parse_args()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.machine()}  "
          f"nproc {len(os.sched_getaffinity(0))}  torch {torch.__version__} ({torch.get_num_threads()} threads)  "
          f"python {platform.python_version()}  load avg {os.getloadavg()[0]:.2f}")
    bench_protocols(args.dim)
    if not args.no_banks:
        bench_banks(args.dim, args.bank_scale, args.memory_gb)
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
