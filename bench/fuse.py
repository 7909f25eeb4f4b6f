"""Stage-two speed: seconds per training epoch from cached features shaped like Flickr30k train.

Synthetic features in memory (float16 tokens): 29,000 images x 577 tokens x 768 (BLIP-like) plus one
768-d global node (CLIP-like); 145,000 captions x 12-30 tokens x 768 plus one 768-d node; scaled by
--scale (the shapes per sample stay the same). Times `Trainer.step` (gather, forward, backward,
optimizer) with the default FuseConfig, for the global-only graph path and the full graph, and
extrapolates to one epoch (145,000 pairs). In the same run it times the full-size backbones' forward
(BLIP ViT-B/16@384 image + text, CLIP ViT-L/14@336 image + text, random weights) for one batch and
scales it to an epoch, as if the backbones were recomputed for every pair (the HADA reference).

    PYTHONPATH=. python bench/fuse.py                           # CPU, reduced scale
    PYTHONPATH=. python bench/fuse.py --scale 1 --device cuda --steps 50 --backbone-batch 64
"""
from __future__ import annotations

import argparse
import time

import torch

from common import full_size_backbones, machine, peak_rss_gib, sync, write_json

from fuse.batch import PackedFeatures  # noqa: E402
from fuse.config import FuseConfig  # noqa: E402
from fuse.data import SplitFeatures  # noqa: E402
from fuse.train import Trainer, build_model, feature_dims, pick_device  # noqa: E402

PAIRS = 145_000


def synthetic(n_images: int, n_captions: int, gen: torch.Generator) -> SplitFeatures:
    def packed(counts: torch.Tensor, width: int, dim: int) -> PackedFeatures:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        tokens = torch.randn(int(offsets[-1]), width, generator=gen).to(torch.float16)
        return PackedFeatures(tokens, offsets, torch.randn(len(counts), dim, generator=gen))

    ones_i, ones_t = torch.ones(n_images, dtype=torch.long), torch.ones(n_captions, dtype=torch.long)
    images = [packed(ones_i * 577, 768, 256), packed(ones_i, 768, 768)]
    texts = [packed(torch.randint(12, 31, (n_captions,), generator=gen), 768, 256), packed(ones_t, 768, 768)]
    return SplitFeatures(None, images, texts, torch.arange(n_images), torch.zeros(n_images, dtype=torch.long), 0)


def time_steps(features: SplitFeatures, cfg: FuseConfig, device, steps: int, gen) -> float:
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(feature_dims(features), cfg), device)
    n_images, n_captions = len(features.images[0]), len(features.texts[0])
    t2i = torch.arange(n_captions) % n_images

    def one():
        captions = torch.randint(0, n_captions, (cfg.batch_size,), generator=gen)
        trainer.step(features, t2i[captions], captions, t2i[captions])

    for _ in range(3):  # warm-up (allocator, kernels, queue)
        one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    return (time.perf_counter() - t0) / steps


@torch.inference_mode()
def backbone_seconds_per_pair(device, batch: int, precision_bf16: bool) -> dict:
    blip, tokenizer, clip = full_size_backbones()
    blip, clip = blip.to(device), clip.to(device)
    ids = tokenizer(["a man in an orange hat is looking at something on the street"] * batch, return_tensors="pt")
    ids = {k: v.to(device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}
    px_blip, px_clip = torch.randn(batch, 3, 384, 384, device=device), torch.randn(batch, 3, 336, 336, device=device)
    text_clip = torch.randint(1, 49407, (batch, 77), device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision_bf16 else torch.autocast(device.type, enabled=False)

    def run():
        with ctx:
            h = blip.vision_model(pixel_values=px_blip).last_hidden_state
            blip.vision_proj(h[:, 0])
            t = blip.text_encoder(**ids).last_hidden_state
            blip.text_proj(t[:, 0])
            clip.encode_image(px_clip)
            clip.encode_text(text_clip)

    run()
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return {"backbone_batch": batch, "seconds_per_pair": (time.perf_counter() - t0) / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.02, help="fraction of Flickr30k train's images and captions")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone-batch", type=int, default=2, help="batch for timing the full-size backbones (0: skip)")
    ap.add_argument("--out", default="bench/results/fuse.json")
    args = ap.parse_args()
    device = pick_device(args.device)
    gen = torch.Generator().manual_seed(0)
    n_images = max(int(29_000 * args.scale), args.batch_size)
    features = synthetic(n_images, 5 * n_images, gen)
    if device.type == "cuda":
        features = features.to(device)
    result = {"scale": args.scale, "images": n_images, "captions": 5 * n_images, "batch_size": args.batch_size}
    for global_only in (True, False):
        cfg = FuseConfig(dataset="bench", backbones="blip,clip", batch_size=args.batch_size, global_only=global_only,
                         device=str(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        per_step = time_steps(features, cfg, device, args.steps, gen)  # Trainer.step applies bf16 autocast on GPU
        key = "global_only" if global_only else "full_graph"
        result[key] = {"seconds_per_step": per_step, "seconds_per_epoch": per_step * PAIRS / args.batch_size}
        if device.type == "cuda":
            result[key]["peak_device_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    result["peak_host_gib"] = round(peak_rss_gib(), 2)
    if args.backbone_batch:
        bb = backbone_seconds_per_pair(device, args.backbone_batch, device.type == "cuda")
        bb["seconds_per_epoch"] = bb["seconds_per_pair"] * PAIRS
        bb["ratio_to_cached_epoch"] = bb["seconds_per_epoch"] / result["global_only"]["seconds_per_epoch"]
        result["recomputed_backbones"] = bb
    info = machine(device)
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(f"cached features: {n_images} images, {5 * n_images} captions (scale {args.scale}), batch {args.batch_size}")
    for key in ("global_only", "full_graph"):
        r = result[key]
        mem = f", peak device {r['peak_device_gib']:.1f} GiB" if "peak_device_gib" in r else ""
        print(f"  {key:12s}: {r['seconds_per_step'] * 1000:8.1f} ms/step -> {r['seconds_per_epoch']:8.1f} s/epoch{mem}")
    print(f"  full graph / global-only: {result['full_graph']['seconds_per_step'] / result['global_only']['seconds_per_step']:.2f}x;"
          f" peak host memory {result['peak_host_gib']} GiB")
    if "recomputed_backbones" in result:
        bb = result["recomputed_backbones"]
        print(f"  backbones recomputed per pair: {bb['seconds_per_pair']:.3f} s/pair -> {bb['seconds_per_epoch']:.0f} s/epoch,"
              f" {bb['ratio_to_cached_epoch']:.0f}x the cached epoch")
    write_json(args.out, {"machine": info, **result})


if __name__ == "__main__":
    main()
