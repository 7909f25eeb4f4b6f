"""The training loop: batches by index from cached tensors, validation recall each epoch, resumable runs."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.device import pick_device
from data.errors import PipelineError
from fuse import checkpoint
from fuse.batch import gather_batch
from fuse.config import FuseConfig
from fuse.data import SplitFeatures, available_memory, load_split_features, open_stores
from fuse.encode import encode_split, recall_of
from fuse.model import HadaModel
from fuse.plot import plot_curves

log = logging.getLogger("pipeline.fuse")


def autocast(device: torch.device):
    """bf16 mixed precision on GPU; plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def build_model(dims: dict, cfg: FuseConfig) -> HadaModel:
    return HadaModel(dims["image_tokens"], dims["image_embeds"], dims["text_tokens"], dims["text_embeds"],
                     cfg.model_config())


def feature_dims(features: SplitFeatures) -> dict:
    (it, ie), (tt, te) = features.image_dims, features.text_dims
    return {"image_tokens": it, "image_embeds": ie, "text_tokens": tt, "text_embeds": te}


def plan_blocks(stores, n_images: int, cfg: FuseConfig) -> list[tuple[int, int]]:
    """One block (all in memory) when the features fit the budget, else contiguous image-id blocks to stream."""
    need = sum(s.nbytes("images") + s.nbytes("texts") for s in stores)
    budget = cfg.memory_gb * 1e9 if cfg.memory_gb else 0.7 * available_memory()
    if need <= budget:
        log.info("train features: %.2f GB, held in memory (budget %.2f GB)", need / 1e9, budget / 1e9)
        return [(0, n_images)]
    n_blocks = math.ceil(need / (0.5 * budget))  # half the budget per block leaves room for the next one
    log.info("train features: %.2f GB exceed the memory budget of %.2f GB: streaming %d blocks of ~%d images, "
             "shuffled by block and within each block", need / 1e9, budget / 1e9, n_blocks,
             math.ceil(n_images / n_blocks))
    edges = [round(k * n_images / n_blocks) for k in range(n_blocks + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def place(features: SplitFeatures, device: torch.device) -> SplitFeatures:
    """Move the features into GPU memory when they take less than half of what is free there."""
    if device.type != "cuda":
        return features
    need = sum(f.tokens.numel() * 2 + f.embeds.numel() * 4 for f in features.images + features.texts)
    free, _ = torch.cuda.mem_get_info(device)
    if need < 0.5 * free:
        log.info("features (%.2f GB) moved to GPU memory", need / 1e9)
        return features.to(device)
    return features


class Trainer:
    """Owns the model, optimiser, schedule and RNG state of one run; one call of ``epoch`` per epoch."""

    def __init__(self, cfg: FuseConfig, model: HadaModel, device: torch.device):
        self.cfg, self.model, self.device = cfg, model.to(device), device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(self.optimizer, T_0=cfg.t0,
                                                                              T_mult=cfg.t_mult)

    def batches(self, features: SplitFeatures, id_start: int, gen: torch.Generator):
        """Shuffled positive pairs of one block as (image rows, caption rows, image ids)."""
        index = features.index
        t2i = torch.from_numpy(index.text_to_image)
        first_caption = int(index.caption_offsets[id_start])
        captions = first_caption + torch.arange(len(features.texts[0]))
        images = t2i[captions]
        table = features.row_table(id_start)
        present = (images - id_start < len(table)) & (table[(images - id_start).clamp_max(len(table) - 1), 0] >= 0)
        captions, images = captions[present], images[present]
        order = torch.randperm(len(captions), generator=gen)
        for k in range(0, len(order), self.cfg.batch_size):
            sel = order[k:k + self.cfg.batch_size]
            img = images[sel]
            view = torch.zeros_like(img)
            if features.views:  # a cached augmented view, or the clean image with probability clean_prob
                aug = torch.rand(len(img), generator=gen) >= self.cfg.clean_prob
                view = torch.where(aug, torch.randint(1, features.views + 1, (len(img),), generator=gen), view)
            rows = table[img - id_start, view]
            rows = torch.where(rows >= 0, rows, table[img - id_start, 0])
            yield rows, captions[sel] - first_caption, img

    def step(self, features: SplitFeatures, rows, caption_rows, image_ids) -> dict[str, float]:
        image_blocks = gather_batch(features.images, rows, self.device)
        text_blocks = gather_batch(features.texts, caption_rows, self.device)
        with autocast(self.device):
            losses = self.model(image_blocks, text_blocks, image_ids.to(self.device))
        if not torch.isfinite(losses["loss"]):
            raise PipelineError(f"non-finite loss ({ {k: float(v.detach()) for k, v in losses.items()} }); stopped. "
                                f"The last good checkpoint is kept; try a lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def run_dir_for(cfg: FuseConfig) -> Path:
    return Path(cfg.runs) / cfg.run_name


def check_same_run(saved: dict, cfg: FuseConfig, versions: dict) -> None:
    """Refuse to resume or initialise from a run with other backbones or split indexes."""
    if saved["backbones"] != cfg.backbone_list:
        raise PipelineError(f"the checkpoint was trained with backbones {','.join(saved['backbones'])}, "
                            f"not {cfg.backbones}")
    for split, version in versions.items():
        if saved["index_versions"].get(split) != version:
            raise PipelineError(f"the checkpoint's {split} split index ({saved['index_versions'].get(split)}) "
                                f"differs from the cache's ({version})")


def train(cfg: FuseConfig) -> dict:
    """Train a run to ``cfg.epochs``; returns its summary. Checkpoints at the end of every epoch."""
    names = cfg.backbone_list
    if len(names) < 2 or len(set(names)) != len(names):
        raise PipelineError(f"--backbones {cfg.backbones!r}: name two or more different backbones, comma-separated")
    device = pick_device(cfg.device)
    train_index, train_stores = open_stores(cfg.cache, cfg.dataset, "train", names)
    val_index, val_stores = open_stores(cfg.cache, cfg.dataset, "val", names)
    versions = {"train": train_index.version, "val": val_index.version}
    val = place(load_split_features(val_index, val_stores, views=False), device)
    blocks = plan_blocks(train_stores, len(train_index.images), cfg)
    whole = place(load_split_features(train_index, train_stores), device) if len(blocks) == 1 else None
    dims = feature_dims(val)

    run_dir = run_dir_for(cfg)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, build_model(dims, cfg), device)
    history, best, bad_epochs = [], -1.0, 0
    if cfg.resume:
        state = checkpoint.load(run_dir / "last.pt")
        check_same_run(state, cfg, versions)
        trainer.restore(state)
        history, best, bad_epochs = state["history"], state["best_rsum"], state["bad_epochs"]
        log.info("resuming %s after epoch %d (best rsum %.2f)", run_dir, len(history), best)
    else:
        if (run_dir / "last.pt").exists():
            raise PipelineError(f"run {run_dir} exists: pass --resume to continue it or --run NAME for a new one")
        if cfg.init:
            state = checkpoint.load(Path(cfg.runs) / cfg.init / "best.pt")
            check_same_run(state, cfg, versions)
            missing = trainer.model.load_state_dict(state["model"], strict=False)
            log.info("initialised from run %s (%s)", cfg.init, missing)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"backbones": names, "dims": dims, "index_versions": versions, "config": cfg.to_dict()}
    checkpoint.write_config(run_dir, {**meta, "device": str(device), "torch": torch.__version__})

    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if bad_epochs >= cfg.patience:
            log.info("early stop: no better validation rsum for %d epochs", bad_epochs)
            break
        t0 = time.perf_counter()
        row = run_epoch(trainer, epoch, blocks, whole, train_index, train_stores, device)
        trainer.model.eval()
        row.update(recall_of(*encode_split(trainer.model, val, device), val))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        improved = row["rsum"] > best
        best, bad_epochs = (row["rsum"], 0) if improved else (best, bad_epochs + 1)
        state = {**trainer.state(), **meta, "epoch": epoch, "history": history, "best_rsum": best,
                 "bad_epochs": bad_epochs}
        if improved:
            checkpoint.save(run_dir / "best.pt", state)
        checkpoint.save(run_dir / "last.pt", state)
        checkpoint.write_metrics(run_dir / "metrics.jsonl", history)
        plot_curves(history, run_dir / "curves.png")
        log.info("epoch %d: loss %.4f, val rsum %.2f%s (%.1f s)", epoch, row["loss"], row["rsum"],
                 " (best)" if improved else "", row["seconds"])
    return {"run": str(run_dir), "epochs": len(history), "best_rsum": best, "history": history}


def run_epoch(trainer: Trainer, epoch: int, blocks, whole, index, stores, device) -> dict:
    """One pass over every positive pair of the train split; returns the epoch's mean losses."""
    trainer.model.train()
    gen = torch.Generator().manual_seed(trainer.cfg.seed * 100_003 + epoch)  # same epoch, same order: resumable
    totals, n, t0 = {}, 0, time.perf_counter()
    bar = tqdm(total=len(index.captions), desc=f"epoch {epoch}", unit="pair", dynamic_ncols=True, leave=False)
    for b in torch.randperm(len(blocks), generator=gen).tolist():
        a, z = blocks[b]
        features = whole if whole is not None else place(load_split_features(index, stores, (a, z)), device)
        for rows, captions, images in trainer.batches(features, a, gen):
            losses = trainer.step(features, rows, captions, images)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v * len(rows)
            n += len(rows)
            bar.update(len(rows))
            bar.set_postfix(loss=f"{losses['loss']:.3f}", pairs_s=f"{n / (time.perf_counter() - t0):.0f}")
    bar.close()
    trainer.scheduler.step()
    return {"epoch": epoch, **{k: v / max(n, 1) for k, v in totals.items()},
            "lr": trainer.optimizer.param_groups[0]["lr"], "pairs_per_s": round(n / (time.perf_counter() - t0), 1)}
