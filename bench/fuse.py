"""Stage-two speed: the training step `pipeline fuse` runs, against its dense-layer floor, and what an epoch
would cost if the backbones were recomputed for every pair (as the HADA reference does).

Cached features: synthetic PackedFeatures built in memory (no HDF5), shaped like Flickr30k train (29,000
images, 145,000 captions) or COCO train (113,287 images, 566,747 captions) and scaled by --scale (fewer
images and captions, the same shapes per sample): per image 577 tokens x 768 (BLIP-like, embed 256) plus one
768-d node (CLIP-like, embed 768); per caption 12-30 tokens x 768 plus one 768-d node. Tokens float16, placed
as training places them (in GPU memory when they fit, `fuse.data.place`), or kept in host memory with
--features host (what a streamed split does: every batch copied to the device).

Timed, --warmup steps untimed then --steps timed, with the default FuseConfig at --batch-size:
* step: `fuse.train.Trainer.step` (gather, forward with momentum encoders, queue and ITM, backward, AdamW),
  no host sync inside (the device is synchronised once before and after the timed steps);
* floor: the same step's dense layers alone on the same batches (per-backbone projections, GATv2's lin_l over
  every node (its matrix product: the step adds its bias inside the attention) and lin_r over the global
  nodes, head merge, output layer; forward, backward, and the momentum encoders' forward), without the
  attention, losses or optimiser;
* the ratio step / floor, s/epoch (pairs / batch x s/step), pairs/s, and the peak resident memory of the
  process (VmHWM) and on a GPU the peak allocated device memory;
* the same ratio in process CPU time: with --threads 1 it measures the work, however loaded the machine is.
--rounds R times (steps, then floor) R times and keeps the best round of each (warm-up in the first only);
it also prints the median over rounds of each round's step / floor.

Recomputed backbones: full-size random-initialised BLIP (ViT-B/16@384 image, BERT-base text, 20 tokens)
and CLIP ViT-L/14@336 QuickGELU (image, text at 77 tokens), one batch of --backbone-batch through all four
encoders, best of --backbone-reps; per pair = one image through both image encoders + one caption through
both text encoders (0 skips it).

    PYTHONPATH=. python bench/fuse.py --scale 0.01 --batch-size 128 --backbone-batch 0 --out r.json  # CPU goal
    PYTHONPATH=. python bench/fuse.py --scale 1.0 --device cuda --precision bf16 --batch-size 40 --steps 50
    PYTHONPATH=. python bench/fuse.py --scale 0.01 --batch-size 128 --no-floor --steps 1 --profile   # where time goes

--profile: after the timed steps, one more warm step under torch.profiler; prints its top operators by self
time (host time on CPU, device time on a GPU), grouped by input shapes, and adds them to the JSON.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT, HERE = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
# `python bench/fuse.py` puts bench/ first on sys.path, where this file would shadow the `fuse` package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from data.logs import hide_third_party_noise  # noqa: E402

hide_third_party_noise()  # before torch_geometric is imported (by fuse.model)

import torch  # noqa: E402

from bench.extract import full_blip, full_clip, machine, sync, write_json  # noqa: E402
from bench.memory import reset_peak_rss, rss_gib  # noqa: E402
from bench.operators import print_operators, top_operators  # noqa: E402
from data.device import autocast, pick_device  # noqa: E402
from data.options import from_options  # noqa: E402
from fuse import native  # noqa: E402
from fuse.batch import PackedFeatures, gather_batch  # noqa: E402
from fuse.config import ATTENTION, FuseConfig  # noqa: E402
from fuse.data import SplitFeatures, place  # noqa: E402
from fuse.model import build_model  # noqa: E402
from fuse.train import Batch, Trainer  # noqa: E402

SHAPES = {"flickr30k": (29_000, 145_000), "coco": (113_287, 566_747)}  # train images, captions


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


def synthetic(n_images: int, n_captions: int, gen: torch.Generator) -> SplitFeatures:
    ones_i, ones_t = torch.ones(n_images, dtype=torch.long), torch.ones(n_captions, dtype=torch.long)
    images = [packed(ones_i * 577, 768, 256, gen), packed(ones_i, 768, 768, gen)]
    texts = [packed(torch.randint(12, 31, (n_captions,), generator=gen), 768, 256, gen),
             packed(ones_t, 768, 768, gen)]
    return SplitFeatures(None, images, texts, torch.arange(n_images), torch.zeros(n_images, dtype=torch.long), 0)


def batches(n_images: int, n_captions: int, batch: int, count: int) -> list[Batch]:
    order = torch.randperm(n_captions, generator=torch.Generator().manual_seed(1))
    out = []
    for k in range(count):
        captions = order[(k * batch + torch.arange(batch)) % n_captions]
        images = captions * n_images // n_captions
        out.append(Batch(0, captions, images, torch.zeros(batch, dtype=torch.long)))
    return out


def floor_pass(encoder, blocks, grad: bool) -> torch.Tensor:
    """The encoder's dense layers on a batch: projections, lin_l (every node), lin_r (global nodes), merge, out."""
    with torch.set_grad_enabled(grad):
        nodes, globals_ = encoder.node_features(blocks)
        starts, base = [], 0
        for b in blocks:
            starts.append(base + b.counts.cumsum(0) - b.counts)
            base += b.tokens.size(0)
        glob = torch.stack(starts, dim=1).reshape(-1)
        # lin_l's matrix product alone: the step adds lin_l's bias where x_l is read, not over all of x_l
        x_l = torch.nn.functional.linear(nodes, encoder.conv.lin_l.weight)
        h = encoder.conv.lin_r(globals_).flatten(0, 1) + x_l[glob]  # every row of x_l computed and differentiated
        return encoder.readout(h, blocks)


def floor_step(trainer: Trainer, features: SplitFeatures, batch: Batch) -> None:
    """The dense layers of one training step: online encoders forward + backward, momentum encoders forward."""
    model, device = trainer.model, trainer.device
    image_blocks = gather_batch(features.images, features.image_rows(batch.images, batch.views), device)
    text_blocks = gather_batch(features.texts, batch.captions, device)
    with autocast(device, trainer.cfg.precision):
        loss = sum((floor_pass(enc, blocks, True) * 1e-3).sum()
                   for enc, blocks in ((model.image_encoder, image_blocks), (model.text_encoder, text_blocks)))
        floor_pass(model.image_encoder_m, image_blocks, False)
        floor_pass(model.text_encoder_m, text_blocks, False)
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_steps(trainer: Trainer, features: SplitFeatures, plan: list[Batch], warmup: int,
               floor: bool) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step (after warm-up) of the training step, or of its dense-layer
    floor. With one thread the CPU time is the work done, whatever else runs on the machine."""
    trainer.model.train()

    def run(batch: Batch) -> None:
        if floor:
            floor_step(trainer, features, batch)
        else:
            trainer.step(features, batch, 0)

    for b in plan[:warmup]:
        run(b)
    sync(trainer.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in plan[warmup:]:
        run(b)
    sync(trainer.device)
    steps = len(plan) - warmup
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


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
    with torch.inference_mode(), autocast(device, precision):
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
    return {"batch": batch, "reps": reps, "precision": precision, "seconds_per_batch": seconds,
            "seconds_per_pair": sum(seconds.values()) / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="flickr30k", help="the train split to imitate")
    ap.add_argument("--scale", type=float, default=0.01, help="fraction of that split's images and captions")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time the steps and then the floor this many times; report the best round of each")
    ap.add_argument("--batch-size", type=int, default=FuseConfig.batch_size)
    ap.add_argument("--attention", choices=tuple(ATTENTION), default=FuseConfig.attention)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--features", choices=("auto", "host"), default="auto",
                    help="auto: in GPU memory when they fit (as training); host: copied per batch (streamed)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int,
                    help="torch.set_num_threads (default: torch's); 1 measures the work on a shared machine, where "
                         "other jobs stall the many short parallel regions of the step more than the floor's GEMMs")
    ap.add_argument("--no-floor", action="store_true", help="skip timing the dense-layer floor")
    ap.add_argument("--backbone-batch", type=int, default=0, help="batch for the full-size backbones (0: skip)")
    ap.add_argument("--backbone-reps", type=int, default=1)
    ap.add_argument("--profile", action="store_true",
                    help="profile one more warm step: print its top operators (self time, input shapes)")
    ap.add_argument("--profile-rows", type=int, default=20, help="operators --profile prints")
    ap.add_argument("--out", default=f"bench/results/fuse-{os.uname().nodename}.json")
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(device)
    images, captions = SHAPES[args.shape]
    n_images = max(round(images * args.scale), args.batch_size)
    n_captions = round(n_images * captions / images)
    t0 = time.perf_counter()
    features = synthetic(n_images, n_captions, torch.Generator().manual_seed(0))
    if args.features == "auto":
        features = place(features, device)
    setup = {"shape": args.shape, "scale": args.scale, "images": n_images, "captions": n_captions,
             "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "attention": args.attention,
             "precision": args.precision, "features_on": str(features.images[0].device),
             "feature_gib": round(sum(f.tokens.numel() * 2 + f.embeds.numel() * 4
                                      for f in features.images + features.texts) / 2 ** 30, 2),
             "build_seconds": round(time.perf_counter() - t0, 1)}
    cfg = from_options(FuseConfig, {"dataset": "bench", "backbones": "blip,clip", "batch_size": args.batch_size,
                                    "attention": args.attention, "precision": args.precision, "device": str(device)})
    dims = {"image_tokens": [768, 768], "image_embeds": [256, 768], "text_tokens": [768, 768],
            "text_embeds": [256, 768]}
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model(dims, cfg), device)
    plan = batches(n_images, n_captions, args.batch_size, args.warmup + args.steps + args.profile)
    profiled = plan.pop() if args.profile else None
    result = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    # Rounds of (steps, then floor): each figure is its best round, so a burst of load in one round is dropped.
    rounds = {"step": [], "floor": []}
    for r in range(args.rounds):
        rounds["step"].append(time_steps(trainer, features, plan, args.warmup if r == 0 else 0, floor=False))
        if r == 0:
            peak_host = round(rss_gib("VmHWM"), 2)
            peak_device = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None
        if not args.no_floor:
            rounds["floor"].append(time_steps(trainer, features, plan, args.warmup if r == 0 else 0, floor=True))
    step, step_cpu = min(w for w, _ in rounds["step"]), min(c for _, c in rounds["step"])
    result["step"] = {"step_seconds": step, "step_cpu_seconds": step_cpu,
                      "epoch_seconds_full_size": step * captions / args.batch_size,
                      "pairs_per_s": args.batch_size / step, "peak_host_gib": peak_host,
                      "rounds": [{"wall": w, "cpu": c} for w, c in rounds["step"]]}
    if peak_device is not None:
        result["step"]["peak_device_gib"] = peak_device
    if not args.no_floor:
        floor, floor_cpu = min(w for w, _ in rounds["floor"]), min(c for _, c in rounds["floor"])
        result["floor"] = {"floor_seconds": floor, "floor_cpu_seconds": floor_cpu,
                           "ratio_step_to_floor": step / floor, "ratio_cpu": step_cpu / floor_cpu,
                           "rounds": [{"wall": w, "cpu": c} for w, c in rounds["floor"]],
                           # Each round's step against the floor timed right after it: on a machine whose speed
                           # drifts, the median of these pairs is steadier than the best of each.
                           "paired_ratios": [s[0] / f[0] for s, f in zip(rounds["step"], rounds["floor"])]}
        result["floor"]["paired_ratio_median"] = statistics.median(result["floor"]["paired_ratios"])
    if profiled is not None:
        result["profile"] = top_operators(lambda: trainer.step(features, profiled, 0), device, args.profile_rows)
    result["step_seconds"] = step
    result["peak_host_gib"] = result["step"]["peak_host_gib"]
    if args.backbone_batch:
        bb = time_backbones(device, args.backbone_batch, args.backbone_reps,
                            "bf16" if device.type == "cuda" else "fp32")
        bb["recomputed_epoch_seconds"] = bb["seconds_per_pair"] * captions + result["step"]["epoch_seconds_full_size"]
        bb["ratio_recomputed_to_cached"] = bb["recomputed_epoch_seconds"] / result["step"]["epoch_seconds_full_size"]
        result["recomputed_backbones"] = bb
    info.update(loadavg_end=[round(x, 2) for x in os.getloadavg()], threads=torch.get_num_threads())
    # Which attention loops ran: the C++ ones (CPU float32) or the torch.compile'd passes.
    setup["attention_loops"] = "c++" if native.in_use() else "compiled"

    print(" ".join(f"{k}={v}" for k, v in {**info, **setup}.items()))
    s = result["step"]
    mem = f", peak device {s['peak_device_gib']} GiB" if "peak_device_gib" in s else ""
    print(f"step   {step * 1e3:9.1f} ms at batch {args.batch_size} ({s['pairs_per_s']:.0f} pairs/s) -> "
          f"{s['epoch_seconds_full_size']:.1f} s per full {args.shape} epoch; peak host {s['peak_host_gib']} GiB{mem}")
    if "floor" in result:
        f = result["floor"]
        print(f"floor  {f['floor_seconds'] * 1e3:9.1f} ms (dense layers alone); "
              f"step / floor = {f['ratio_step_to_floor']:.2f}")
        print(f"cpu    step {step_cpu * 1e3:.1f} ms, floor {floor_cpu * 1e3:.1f} ms of process CPU time; "
              f"step / floor = {f['ratio_cpu']:.2f}")
        pairs = f["paired_ratios"]
        print(f"rounds step / floor of the same round: median {f['paired_ratio_median']:.2f} "
              f"(min {min(pairs):.2f}, max {max(pairs):.2f}, {len(pairs)} rounds)")
    if "recomputed_backbones" in result:
        bb = result["recomputed_backbones"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in bb["seconds_per_batch"].items())
        print(f"backbones, batch {bb['batch']} {bb['precision']}: {parts} s -> {bb['seconds_per_pair'] * 1e3:.1f} "
              f"ms/pair; recomputed epoch {bb['recomputed_epoch_seconds']:.0f} s = "
              f"{bb['ratio_recomputed_to_cached']:.1f}x the cached epoch")
    if "profile" in result:
        print_operators(result["profile"])
    write_json(args.out, {"machine": info, "setup": setup, **result})


if __name__ == "__main__":
    main()
