"""Stage-one throughput: the pipeline's shard runner against the bare backbone forward on the same batches.

Bare forward: every image decoded and preprocessed into memory first (not timed), then only
`encode_images` is timed; captions likewise with pre-tokenized batches. Pipeline: `run_shard` on the
same rows (DataLoader decoding, inference, packing, atomic HDF5 write), images and captions timed
separately. Also bytes on disk per image and per caption.

    PYTHONPATH=. python bench/extract.py                        # tiny backbones, CPU
    PYTHONPATH=. python bench/extract.py --full --device cuda --precision bf16 --images 2048 --batch-size 128
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import machine, peak_rss_gib, register_full_size, sync, write_json

from data.datasets import load_split, resolve  # noqa: E402
from data.demo import generate_demo  # noqa: E402
from extract.config import ExtractConfig  # noqa: E402
from extract.reader import load_rgb  # noqa: E402
from extract.run import fingerprint  # noqa: E402
from extract.shard import ShardJob, autocast, load_backbone, pick_device, run_shard  # noqa: E402


def bare(backbone, index, image_root: Path, cfg, device) -> dict:
    """Seconds of encode_images / encode_texts alone, inputs prepared beforehand."""
    tf = backbone.eval_transform()
    pixels = torch.stack([tf(load_rgb(image_root / p)) for p in index.images])
    token_batches = [{k: v.to(device) for k, v in backbone.tokenize(list(index.captions[i:i + cfg.batch_size])).inputs.items()}
                     for i in range(0, len(index.captions), cfg.batch_size)]
    with torch.inference_mode(), autocast(device, cfg.precision):
        backbone.encode_images(pixels[: cfg.batch_size].to(device))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(pixels), cfg.batch_size):
            backbone.encode_images(pixels[i:i + cfg.batch_size].to(device))
        sync(device)
        t_img = time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in token_batches:
            backbone.encode_texts(batch)
        sync(device)
        t_txt = time.perf_counter() - t0
    return {"images_s": len(pixels) / t_img, "captions_s": len(index.captions) / t_txt}


def pipeline(backbone_name, index, spec, cfg, device) -> dict:
    backbone = load_backbone(cfg, device)
    attrs = fingerprint(cfg, backbone, index.version)
    out = {}
    for kind, n in (("images", len(index.images)), ("texts", len(index.captions))):
        job = ShardJob(kind, 0, 0, n)
        t0 = time.perf_counter()
        result = run_shard(job, cfg, index, spec.image_root, attrs)
        sync(device)
        seconds = time.perf_counter() - t0
        out[f"{kind}_s"] = n / seconds
        out[f"bytes_per_{'image' if kind == 'images' else 'caption'}"] = result.bytes / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", action="append", help="repeatable (default: the tiny pair, or the full pair with --full)")
    ap.add_argument("--full", action="store_true", help="full-size random-init BLIP ViT-B/16@384 and CLIP ViT-L/14@336")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--out", default="bench/results/extract.json")
    args = ap.parse_args()
    if args.full:
        register_full_size()
    names = args.backbone or (["blip-full", "clip-full"] if args.full else ["blip-tiny", "clip-tiny"])
    device = pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo(Path(tmp) / "data", n_train=0, n_val=0, n_test=args.images, image_size=args.image_size)
        spec = resolve("demo", Path(tmp) / "data")
        index = load_split(spec, "test")
        for name in names:
            cfg = ExtractConfig(backbone=name, dataset="demo", split="test", data_root=str(Path(tmp) / "data"),
                                cache=str(Path(tmp) / "cache"), batch_size=args.batch_size, workers=args.workers,
                                device=str(device), precision=args.precision, shard_size=10 ** 9)
            (Path(tmp) / "cache" / "demo" / "test" / name).mkdir(parents=True, exist_ok=True)
            ref = bare(load_backbone(cfg, device), index, spec.image_root, cfg, device)
            got = pipeline(name, index, spec, cfg, device)
            rows.append({"backbone": name, "bare_images_s": ref["images_s"], "pipeline_images_s": got["images_s"],
                         "image_ratio": got["images_s"] / ref["images_s"], "bare_captions_s": ref["captions_s"],
                         "pipeline_captions_s": got["texts_s"], "caption_ratio": got["texts_s"] / ref["captions_s"],
                         "bytes_per_image": got["bytes_per_image"], "bytes_per_caption": got["bytes_per_caption"]})
    info = {**machine(device), "images": args.images, "image_size": args.image_size, "batch_size": args.batch_size,
            "workers": args.workers, "precision": args.precision, "peak_rss_gib": round(peak_rss_gib(), 2)}
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'backbone':10s} {'bare img/s':>10s} {'pipe img/s':>10s} {'ratio':>6s} {'bare cap/s':>10s} "
          f"{'pipe cap/s':>10s} {'ratio':>6s} {'B/image':>9s} {'B/caption':>9s}")
    for r in rows:
        print(f"{r['backbone']:10s} {r['bare_images_s']:10.1f} {r['pipeline_images_s']:10.1f} {r['image_ratio']:6.2f} "
              f"{r['bare_captions_s']:10.1f} {r['pipeline_captions_s']:10.1f} {r['caption_ratio']:6.2f} "
              f"{r['bytes_per_image']:9.0f} {r['bytes_per_caption']:9.0f}")
    write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
