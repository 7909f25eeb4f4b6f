"""Stage-one throughput: the extraction pipeline against the bare backbone forward, same batches, same run.

For each backbone, on N generated JPEGs (demo scenes) of the test split:
  bare      images: all images decoded and preprocessed into memory and moved to the device first (not
            timed; the single-process decode+preprocess rate is reported as `prep img/s`), then only
            `backbone.encode_images` is timed, batch by batch, under torch.inference_mode().
            captions: likewise, tokenized beforehand, only `backbone.encode_texts` timed.
  pipeline  `extract.run.run_extract` into a fresh cache (scheduler sync, one shard per kind unless
            N > --shard-size). Images and captions are timed separately by wrapping the shard runner
            (`run_shard`: decoding in `--workers` threads, inference, packing, HDF5 write);
            `e2e s` is the whole run_extract call (both kinds plus index, size estimate and manifest).
Each is timed --repeats times (the pipeline into a new cache each time) and the best is reported: on a
shared 2-core machine other processes slow single passes down by up to 30x; all passes go into the JSON.
Bytes per image / caption are the shard files' sizes divided by their rows. `--full` builds full-size
random-initialised architectures (BLIP ViT-B/16@384 retrieval, CLIP ViT-L/14@336 QuickGELU) instead of
the tiny ones; BLIP's tokenizer is then the tiny BERT vocabulary (no hub access), same token counts as
the demo words need.

    PYTHONPATH=. python bench/extract.py                                   # tiny backbones, CPU
    PYTHONPATH=. python bench/extract.py --full --images 8 --batch-size 4 --repeats 1   # full-size, CPU, ~2 min
    PYTHONPATH=. python bench/extract.py --full --device cuda --precision bf16 --images 2048 --batch-size 128 \
        --workers 12 --repeats 2                                          # what bench/gpu.sh runs
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT, HERE = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
# `python bench/extract.py` puts bench/ first on sys.path, where this file would shadow the `extract` package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import extract.run  # noqa: E402
from data.datasets import load_split, resolve  # noqa: E402
from data.demo import generate_demo  # noqa: E402
from data.device import autocast, pick_device  # noqa: E402
from data.store import read_shard_attrs  # noqa: E402
from extract.backbones import load  # noqa: E402
from extract.config import DEFAULT_SHARD_SIZE, ExtractConfig  # noqa: E402
from extract.reader import load_rgb  # noqa: E402


def machine(device: torch.device) -> dict:
    info = {"host": platform.node(), "nproc": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "device": str(device),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


# ---- full-size random-initialised architectures (no downloads) ----

def full_blip():
    """BLIP retrieval model with BlipConfig()'s sizes (ViT-B/16 at 384, BERT-base text), random weights."""
    from transformers import BlipConfig, BlipForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from extract.backbones.blip import Blip, tiny_blip

    # The default vision initializer_range (1e-10) makes every image give the same features.
    config = BlipConfig(vision_config=dict(image_size=384, initializer_range=0.02),
                        text_config=dict(initializer_range=0.02))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForImageTextRetrieval(config)
    tokenizer = tiny_blip()[1]  # stand-in for bert-base-uncased (needs the hub); a fast BERT tokenizer too
    return Blip("blip-full", model, tokenizer, BlipImageProcessorPil(size={"height": 384, "width": 384}),
                "random-init(full-size)")


def full_clip():
    """open_clip ViT-L-14-336-quickgelu, random weights."""
    import open_clip

    from extract.backbones.clip import Clip

    name = "ViT-L-14-336-quickgelu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
    preprocess = open_clip.image_transform(336, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    return Clip("clip-full", model, preprocess, open_clip.get_tokenizer(name), name, "random-init(full-size)", False)


def register_full() -> None:
    from extract.backbones import register

    register("blip-full", "full-size BLIP, random weights (benchmarks only)")(lambda options: full_blip())
    register("clip-full", "full-size CLIP ViT-L/14@336, random weights (benchmarks only)")(lambda options: full_clip())


# ---- the two measurements ----

def bare(backbone, index, image_root: Path, batch_size: int, device, precision: str, repeats: int) -> dict:
    """Best (least) seconds over ``repeats`` passes of encode_images / encode_texts alone."""
    tf = backbone.eval_transform()
    t0 = time.perf_counter()
    pixels = torch.stack([tf(load_rgb(image_root / p)) for p in index.images])
    prep_s = time.perf_counter() - t0
    image_batches = [pixels[i:i + batch_size].to(device) for i in range(0, len(pixels), batch_size)]
    captions = list(index.captions)
    text_batches = [{k: v.to(device) for k, v in backbone.tokenize(captions[i:i + batch_size]).inputs.items()}
                    for i in range(0, len(captions), batch_size)]
    del pixels

    def seconds(fn, batches) -> float:
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        sync(device)
        return time.perf_counter() - t0

    with torch.inference_mode(), autocast(device, precision):
        backbone.encode_images(image_batches[0])  # warm-up
        backbone.encode_texts(text_batches[0])
        t_img = [seconds(backbone.encode_images, image_batches) for _ in range(repeats)]
        t_txt = [seconds(backbone.encode_texts, text_batches) for _ in range(repeats)]
    return {"image_seconds": t_img, "caption_seconds": t_txt, "prep_seconds": prep_s}


def pipeline(cfg: ExtractConfig) -> dict:
    """run_extract with its shard runner wrapped to time images and captions apart."""
    seconds = {"images": 0.0, "texts": 0.0}
    inner = extract.run.run_shard

    def timed(job, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(job, *args, **kwargs)  # returns after the shard is on disk (tokens already on the host)
        finally:
            seconds[job.kind] += time.perf_counter() - t0

    extract.run.run_shard = timed
    try:
        t0 = time.perf_counter()
        summary = extract.run.run_extract(cfg)
        total = time.perf_counter() - t0
    finally:
        extract.run.run_shard = inner
    out = {"image_seconds": seconds["images"], "caption_seconds": seconds["texts"], "e2e_seconds": total}
    for kind, unit in (("images", "image"), ("texts", "caption")):
        files = sorted(Path(summary["store"]).glob(f"{kind}-*.h5"))
        rows = sum(int(read_shard_attrs(f)["rows"]) for f in files)
        out[f"bytes_per_{unit}"] = sum(f.stat().st_size for f in files) / max(rows, 1)
    shutil.rmtree(cfg.cache)  # full-size BLIP: ~0.9 MB per image and run
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", action="append", help="repeatable; default blip-tiny and clip-tiny "
                                                        "(with --full: blip-full and clip-full)")
    ap.add_argument("--full", action="store_true", help="full-size random-initialised BLIP and CLIP architectures")
    ap.add_argument("--images", type=int, default=512, help="JPEGs to generate (5 captions each)")
    ap.add_argument("--image-size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads of the pipeline")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each; the best is reported")
    ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--workdir", help="where images and caches go (default: a temporary folder, removed)")
    ap.add_argument("--out", default=f"bench/results/extract-{platform.node()}.json")
    args = ap.parse_args()
    device = pick_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.full:
        register_full()
    names = args.backbone or (["blip-full", "clip-full"] if args.full else ["blip-tiny", "clip-tiny"])
    info = machine(device)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        data_root = Path(tmp) / "data"
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            generate_demo(data_root, n_train=0, n_val=0, n_test=args.images, image_size=args.image_size)
        info["generate_seconds"] = round(time.perf_counter() - t0, 1)
        spec = resolve("demo", data_root)
        index = load_split(spec, "test")
        n_img, n_cap = len(index.images), len(index.captions)
        for name in names:
            def config(k: int, name: str = name) -> ExtractConfig:  # a fresh cache folder per pipeline run
                return ExtractConfig(backbone=name, dataset="demo", split="test", data_root=str(data_root),
                                     cache=str(Path(tmp) / f"cache-{name}-{k}"), batch_size=args.batch_size,
                                     shard_size=args.shard_size, workers=args.workers, device=str(device),
                                     precision=precision)
            t0 = time.perf_counter()
            backbone = load(name, config(0).backbone_options(), device)  # the instance run_extract will use
            build_s = time.perf_counter() - t0
            ref = bare(backbone, index, spec.image_root, args.batch_size, device, precision, args.repeats)
            runs = [pipeline(config(k)) for k in range(args.repeats)]
            best = {k: min(r[k] for r in runs) for k in ("image_seconds", "caption_seconds", "e2e_seconds")}
            r = {"backbone": name, "build_seconds": round(build_s, 1),
                 "bare_images_per_s": n_img / min(ref["image_seconds"]),
                 "pipeline_images_per_s": n_img / best["image_seconds"],
                 "bare_captions_per_s": n_cap / min(ref["caption_seconds"]),
                 "pipeline_captions_per_s": n_cap / best["caption_seconds"],
                 "prep_images_per_s_1proc": n_img / ref["prep_seconds"],
                 "bytes_per_image": runs[0]["bytes_per_image"], "bytes_per_caption": runs[0]["bytes_per_caption"],
                 "e2e_seconds": best["e2e_seconds"],
                 "all_seconds": {"bare_images": ref["image_seconds"], "bare_captions": ref["caption_seconds"],
                                 **{f"pipeline_{k}": [x[k] for x in runs]
                                    for k in ("image_seconds", "caption_seconds", "e2e_seconds")}}}
            r["image_ratio"] = r["pipeline_images_per_s"] / r["bare_images_per_s"]
            r["caption_ratio"] = r["pipeline_captions_per_s"] / r["bare_captions_per_s"]
            rows.append(r)
    info.update(loadavg_end=[round(x, 2) for x in os.getloadavg()], peak_rss_gib=round(peak_rss_gib(), 2))
    if device.type == "cuda":
        info["peak_device_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    setup = {"images": len(index.images), "captions": len(index.captions), "image_size": args.image_size,
             "batch_size": args.batch_size, "workers": args.workers, "shard_size": args.shard_size,
             "precision": precision, "repeats": args.repeats, "full": args.full}
    print(" ".join(f"{k}={v}" for k, v in {**info, **setup}.items()))
    head = ("backbone", "bare img/s", "pipe img/s", "ratio", "bare cap/s", "pipe cap/s", "ratio", "prep img/s",
            "B/image", "B/caption", "e2e s")
    print(("{:<10}" + " {:>10}" * (len(head) - 1)).format(*head))
    for r in rows:
        print(f"{r['backbone']:<10} {r['bare_images_per_s']:>10.1f} {r['pipeline_images_per_s']:>10.1f} "
              f"{r['image_ratio']:>10.2f} {r['bare_captions_per_s']:>10.1f} {r['pipeline_captions_per_s']:>10.1f} "
              f"{r['caption_ratio']:>10.2f} {r['prep_images_per_s_1proc']:>10.1f} {r['bytes_per_image']:>10.0f} "
              f"{r['bytes_per_caption']:>10.0f} {r['e2e_seconds']:>10.1f}")
    print("prep img/s = JPEG decode + eval transform in one process (the pipeline's ceiling is about workers x this)")
    write_json(args.out, {"machine": info, "setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
