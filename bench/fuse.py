"""Stage-two speed: seconds per epoch of `pipeline fuse`'s training step on cached features, and what an
epoch would cost if the backbones were recomputed for every pair (as the HADA reference does).

Cached features: synthetic PackedFeatures built in memory (no HDF5), shaped like Flickr30k train and
scaled by --scale (fewer images and captions, the same shapes per sample): 29,000 images x 577 tokens
x 768 (BLIP-like, embed 256) plus one 768-d node (CLIP-like, embed 768); 145,000 captions (5 per image)
x 12-30 tokens x 768 plus one 768-d node. Tokens float16, moved to the GPU as training does
(`fuse.train.place`). Timed: `fuse.train.Trainer.step` (gather_batch, forward with momentum encoders,
queue and ITM, backward, AdamW step, loss read-back) with the default FuseConfig (batch 128, width 512,
queue 65,536; bf16 autocast on GPU), --warmup steps untimed then --steps timed, for global_only=True
and False (the full graph); s/epoch = s/step x 145,000 / batch. `gather` is gather_batch alone.

Recomputed backbones: full-size random-initialised BLIP (ViT-B/16@384 image, BERT-base text, 20 tokens)
and CLIP ViT-L/14@336 QuickGELU (image, text at 77 tokens), one batch of --backbone-batch through all
four encoders (after a batch-1 warm-up), best of --backbone-reps; per pair = one image through both
image encoders + one caption through both text encoders. The recomputed epoch is that x 145,000 plus
the cached-feature step (the fusion still trains); batched, so a lower bound for the reference, which
runs them one sample at a time.

    PYTHONPATH=. python bench/fuse.py                                  # CPU, scale 0.02, batch 128 (~8 min, 17 GiB)
    PYTHONPATH=. python bench/fuse.py --batch-size 32 --warmup 1 --steps 2  # CPU, ~2 min, 6 GiB
    PYTHONPATH=. python bench/fuse.py --scale 1.0 --device cuda --steps 30 --backbone-batch 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT, HERE = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
# `python bench/fuse.py` puts bench/ first on sys.path, where this file would shadow the `fuse` package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402

from bench.extract import full_blip, full_clip, machine, peak_rss_gib, sync, write_json  # noqa: E402
from data.device import autocast as backbone_autocast  # noqa: E402
from fuse.batch import PackedFeatures, gather_batch  # noqa: E402
from fuse.config import FuseConfig  # noqa: E402
from fuse.data import SplitFeatures  # noqa: E402
from fuse.train import Trainer, build_model, feature_dims, pick_device, place  # noqa: E402

IMAGES, CAPTIONS_PER_IMAGE, PAIRS = 29_000, 5, 145_000


def random_rows(n: int, width: int, gen: torch.Generator, block: int = 1 << 16) -> torch.Tensor:
    """(n, width) float16 from one random block, tiled: fast at 30 GB, and the values do not change timings."""
    src = torch.randn(min(block, n), width, generator=gen).to(torch.float16)
    out = torch.empty(n, width, dtype=torch.float16)
    for i in range(0, n, len(src)):
        out[i:i + len(src)] = src[:n - i]
    return out


def packed(counts: torch.Tensor, width: int, embed_dim: int, gen: torch.Generator) -> PackedFeatures:
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return PackedFeatures(random_rows(int(offsets[-1]), width, gen), offsets,
                          torch.randn(len(counts), embed_dim, generator=gen))


def synthetic(n_images: int, gen: torch.Generator) -> SplitFeatures:
    n_captions = CAPTIONS_PER_IMAGE * n_images
    ones_i, ones_t = torch.ones(n_images, dtype=torch.long), torch.ones(n_captions, dtype=torch.long)
    images = [packed(ones_i * 577, 768, 256, gen), packed(ones_i, 768, 768, gen)]
    texts = [packed(torch.randint(12, 31, (n_captions,), generator=gen), 768, 256, gen), packed(ones_t, 768, 768, gen)]
    return SplitFeatures(None, images, texts, torch.arange(n_images), torch.zeros(n_images, dtype=torch.long), 0)


def time_training(features: SplitFeatures, cfg: FuseConfig, device, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(feature_dims(features), cfg), device)
    trainer.model.train()
    n_captions = len(features.texts[0])
    order = torch.randperm(n_captions, generator=torch.Generator().manual_seed(1))
    batches = []
    for k in range(warmup + steps):  # (image rows, caption rows, image ids), as Trainer.batches yields them
        captions = order[(k * cfg.batch_size + torch.arange(cfg.batch_size)) % n_captions]
        images = captions // CAPTIONS_PER_IMAGE
        batches.append((images, captions, images))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for b in batches[:warmup]:
        trainer.step(features, *b)
    sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        trainer.step(features, *b)  # ends with float(loss): a device sync every step, as in training
    sync(device)
    per_step = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for rows, captions, _ in batches[warmup:]:
        gather_batch(features.images, rows, device)
        gather_batch(features.texts, captions, device)
    sync(device)
    out = {"seconds_per_step": per_step, "seconds_per_epoch": per_step * PAIRS / cfg.batch_size,
           "gather_seconds_per_step": (time.perf_counter() - t0) / steps}
    if device.type == "cuda":
        out["peak_device_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def time_backbones(device, batch: int, reps: int, precision: str) -> dict:
    """Seconds of one batch through each full-size encoder (best of reps), after a batch-1 warm-up."""
    blip, clip = full_blip().to(device), full_clip().to(device)
    gen = torch.Generator().manual_seed(0)

    def inputs(n):
        ids = torch.randint(1000, 30000, (n, 20), generator=gen)
        return {"blip_image": torch.randn(n, 3, 384, 384, generator=gen).to(device),
                "blip_text": {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)},
                "clip_image": torch.randn(n, 3, 336, 336, generator=gen).to(device),
                "clip_text": {"text": torch.randint(1, 49407, (n, 77), generator=gen).to(device)}}

    encoders = {"blip_image": blip.encode_images, "blip_text": blip.encode_texts,
                "clip_image": clip.encode_images, "clip_text": clip.encode_texts}
    seconds = {}
    with torch.inference_mode(), backbone_autocast(device, precision):
        small, full = inputs(1), inputs(batch)
        for name, fn in encoders.items():
            fn(small[name])
            times = []
            for _ in range(reps):
                sync(device)
                t0 = time.perf_counter()
                fn(full[name])
                sync(device)
                times.append(time.perf_counter() - t0)
            seconds[name] = min(times)
    per_pair = sum(seconds.values()) / batch
    return {"batch": batch, "reps": reps, "precision": precision, "seconds_per_batch": seconds,
            "seconds_per_pair": per_pair, "seconds_per_epoch": per_pair * PAIRS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.02, help="fraction of Flickr30k train's 29,000 images")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--batch-size", type=int, default=FuseConfig.batch_size)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone-batch", type=int, default=8, help="batch for the full-size backbones (0: skip)")
    ap.add_argument("--backbone-reps", type=int, default=1)
    ap.add_argument("--backbone-precision", choices=["fp32", "bf16"], help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--out", default=f"bench/results/fuse-{os.uname().nodename}.json")
    args = ap.parse_args()
    device = pick_device(args.device)
    info = machine(device)
    n_images = max(round(IMAGES * args.scale), args.batch_size)
    t0 = time.perf_counter()
    features = place(synthetic(n_images, torch.Generator().manual_seed(0)), device)
    setup = {"scale": args.scale, "images": n_images, "captions": CAPTIONS_PER_IMAGE * n_images,
             "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
             "feature_gib": round(sum(f.tokens.numel() * 2 + f.embeds.numel() * 4
                                      for f in features.images + features.texts) / 2 ** 30, 2),
             "features_on": str(features.images[0].device), "build_seconds": round(time.perf_counter() - t0, 1)}
    result = {}
    for global_only in (True, False):
        cfg = FuseConfig(dataset="bench", backbones="blip,clip", batch_size=args.batch_size,
                         global_only=global_only, device=str(device))
        result["global_only" if global_only else "full_graph"] = time_training(
            features, cfg, device, args.warmup, args.steps)
    info["peak_rss_gib_training"] = round(peak_rss_gib(), 2)
    del features
    if args.backbone_batch:
        precision = args.backbone_precision or ("bf16" if device.type == "cuda" else "fp32")
        bb = time_backbones(device, args.backbone_batch, args.backbone_reps, precision)
        cached = result["global_only"]["seconds_per_epoch"]
        bb["recomputed_epoch_seconds"] = bb["seconds_per_epoch"] + cached
        bb["ratio_recomputed_to_cached"] = bb["recomputed_epoch_seconds"] / cached
        result["recomputed_backbones"] = bb
    info.update(loadavg_end=[round(x, 2) for x in os.getloadavg()], peak_rss_gib=round(peak_rss_gib(), 2))

    print(" ".join(f"{k}={v}" for k, v in {**info, **setup}.items()))
    for key in ("global_only", "full_graph"):
        r = result[key]
        mem = f"  peak device {r['peak_device_gib']:.1f} GiB" if "peak_device_gib" in r else ""
        print(f"{key:<12} {r['seconds_per_step'] * 1e3:9.1f} ms/step (gather {r['gather_seconds_per_step'] * 1e3:6.1f})"
              f" -> {r['seconds_per_epoch']:9.1f} s/epoch{mem}")
    slower = result["full_graph"]["seconds_per_step"] / result["global_only"]["seconds_per_step"]
    print(f"full graph / global-only: {slower:.2f}x; peak host RSS {info['peak_rss_gib_training']} GiB (training),"
          f" {info['peak_rss_gib']} GiB (end)")
    if "recomputed_backbones" in result:
        bb = result["recomputed_backbones"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in bb["seconds_per_batch"].items())
        print(f"backbones, batch {bb['batch']} {bb['precision']}: {parts} s"
              f" -> {bb['seconds_per_pair'] * 1e3:.1f} ms/pair -> {bb['seconds_per_epoch']:.0f} s/epoch;"
              f" recomputed epoch {bb['recomputed_epoch_seconds']:.0f} s"
              f" = {bb['ratio_recomputed_to_cached']:.1f}x the cached global-only epoch")
    write_json(args.out, {"machine": info, "setup": setup, **result})


if __name__ == "__main__":
    main()
