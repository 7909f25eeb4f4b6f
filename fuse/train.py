"""The training loop: HADA-LAVIS's recipe on cached tensors, validation recall each epoch, resumable runs.

Recipe (``Controller.train``/``train_epoch``): AdamW over every trainable tensor (temperature and w included),
``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` stepped after every iteration with the fractional epoch
``epoch + i / iterations``, validation rsum after every epoch, a new best only when it beats the old one by
``min_improvement``, early stop after ``patience`` epochs without one. A last partial batch is dropped (the
reference drops it on COCO; Flickr30k's 145,000 pairs have none at batch 40).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from data.device import autocast, compute_dtype, pick_device
from data.errors import PipelineError
from data.progress import Progress
from data.store import common_settings, refuse_other_settings
from fuse import checkpoint
from fuse.attention import implementation
from fuse.batch import gather_batch
from fuse.config import ATTENTION, FuseConfig
from fuse.data import (
    SplitFeatures,
    load_split_features,
    memory_budget_gb,
    open_stores,
    place,
    plan_blocks,
    present_images,
    store_dims,
    stored_views,
)
from fuse.encode import encode_split, eval_batch_size, recall_of
from fuse.model import HadaModel, build_model
from fuse.plot import plot_curves
from fuse.settings import settle_config

log = logging.getLogger("pipeline.fuse")
CHECK_EVERY = 50  # steps between reads of the device-side loss sums (the only host syncs of an epoch)
NO_VIEWS = "the train stores hold no augmented views"  # how the warning starts (the demo says why it has none)


@dataclass
class Batch:
    """A step's positive pairs: caption rows of the split, their image rows, and which view of each image."""

    block: int
    captions: torch.Tensor
    images: torch.Tensor
    views: torch.Tensor


def epoch_plan(index, present: np.ndarray, blocks: list[tuple[int, int]], views: int, batch_size: int,
               clean_prob: float, gen: torch.Generator) -> list[Batch]:
    """Every positive pair of the train split once, shuffled (block order, then pairs within a block), in
    batches; a block's last partial batch is dropped when the block has a full one. With cached views each
    visit takes one of them uniformly (or the clean image with probability ``clean_prob``)."""
    t2i = torch.from_numpy(index.text_to_image)
    has_image = torch.zeros(len(index.images), dtype=torch.bool)
    has_image[torch.from_numpy(present)] = True
    plan = []
    for b in torch.randperm(len(blocks), generator=gen).tolist():
        lo, hi = (int(index.caption_offsets[x]) for x in blocks[b])
        captions = torch.arange(lo, hi)
        captions = captions[has_image[t2i[captions]]]
        captions = captions[torch.randperm(len(captions), generator=gen)]
        full = len(captions) // batch_size
        for k in range(0, full * batch_size if full else len(captions), batch_size):
            sel = captions[k:k + batch_size]
            view = torch.zeros(len(sel), dtype=torch.long)
            if views:
                aug = torch.rand(len(sel), generator=gen) >= clean_prob
                view = torch.where(aug, torch.randint(1, views + 1, (len(sel),), generator=gen), view)
            plan.append(Batch(b, sel, t2i[sel], view))
    return plan


class Trainer:
    """Owns the model, optimiser, schedule and RNG state of one run."""

    def __init__(self, cfg: FuseConfig, model: HadaModel, device: torch.device):
        self.cfg, self.model, self.device = cfg, model.to(device), device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.optimizer, T_0=cfg.t0, T_mult=cfg.t_mult, eta_min=cfg.eta_min)

    def step(self, features: SplitFeatures, batch: Batch, id_start: int = 0,
             first_caption: int = 0) -> dict[str, torch.Tensor]:
        """One optimiser step on ``features`` (a block whose first image and caption are ``id_start`` and
        ``first_caption`` of the split); returns the losses as detached device tensors (no host sync)."""
        rows = features.image_rows(batch.images, batch.views, id_start)
        image_blocks = gather_batch(features.images, rows, self.device)
        text_blocks = gather_batch(features.texts, batch.captions - first_caption, self.device)
        with autocast(self.device, self.cfg.precision):
            losses = self.model(image_blocks, text_blocks, batch.images.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in losses.items()}

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

    def init_from(self, state: dict, momentum: bool) -> None:
        """HADA's stage two: the encoders and the ITM head from a finished run; temperature, w and queues as
        new, and (as the reference) the momentum encoders left at this model's random initialisation unless
        ``momentum``."""
        parts = ("image_encoder.", "text_encoder.", "itm_head.")
        self.model.load_partial({k: v for k, v in state["model"].items() if k.startswith(parts)}, momentum)


def run_dir_for(cfg: FuseConfig) -> Path:
    return Path(cfg.runs) / cfg.run_name


def check_saved_run(saved: dict, versions: dict, dims: dict, names: list[str], what: str,
                    settings: dict[str, dict] | None = None) -> None:
    """Refuse to resume or initialise from a run made on other split indexes, stores of other widths, or stores
    of other settings.

    A split the saved run does not record (an imported run knows only val and test) is not compared.
    """
    for name, now in (settings or {}).items():
        was = saved.get("store_settings", {}).get(name)
        if was is not None:
            refuse_other_settings(was, now, name, "train", what, "the cache's store")
    for split, version in versions.items():
        if split in saved["index_versions"] and saved["index_versions"][split] != version:
            raise PipelineError(f"{what} was trained on {split} split index {saved['index_versions'][split]}, "
                                f"but the cache's is {version}: the dataset changed since")
    for key, widths in dims.items():
        was = saved.get("dims", {}).get(key, widths)
        for name, old, new in zip(names, was, widths):
            if old != new:
                raise PipelineError(f"{what} was trained on {name} {key.replace('_', ' ')} of width {old}, but the "
                                    f"cache's store {name!r} now has {new}: re-extract it or start a new --run")


def train(cfg: FuseConfig, given: frozenset[str] | None = None) -> dict:
    """Train a run to ``cfg.epochs``; returns its summary. Checkpoints at the end of every epoch.

    ``given``: the options set on the command line (None: all); with ``--resume``/``--init`` the others take
    the saved run's values (see ``fuse.settings``).
    """
    resumed = init = None
    if cfg.resume:
        if not cfg.run:
            raise PipelineError("--resume needs --run NAME (the run to continue)")
        resumed = checkpoint.load(run_dir_for(cfg) / "last.pt", f"run {cfg.run!r} (--resume)")
        cfg = settle_config(cfg, resumed["config"], given, "resume")
    elif cfg.init:
        init = checkpoint.load(Path(cfg.runs) / cfg.init / "best.pt", f"run {cfg.init!r} (--init)")
        cfg = settle_config(cfg, init["config"], given, "init")
    run_dir = run_dir_for(cfg)  # --run and --runs are given with --resume: the settled config keeps them
    names = cfg.backbone_list
    if len(names) < 2 or len(set(names)) != len(names):
        raise PipelineError(f"--backbones {cfg.backbones!r}: name two or more different backbones, comma-separated")
    if not resumed and (run_dir / "last.pt").exists():
        raise PipelineError(f"run {run_dir} exists: pass --resume to continue it or --run NAME for a new one")
    device = pick_device(cfg.device)
    train_index, train_stores = open_stores(cfg.cache, cfg.dataset, "train", names)
    val_index, val_stores = open_stores(cfg.cache, cfg.dataset, "val", names)
    versions = {"train": train_index.version, "val": val_index.version}
    settings = common_settings(names, {"train": train_stores, "val": val_stores})
    dims = store_dims(val_stores)
    for saved, what in ((resumed, f"run {cfg.run}"), (init, f"run {cfg.init}")):
        if saved:
            check_saved_run(saved, versions, dims, names, what, settings)
    # The resolved budget is saved: a resume without --memory-gb streams (or not) the same blocks.
    cfg = replace(cfg, memory_gb=memory_budget_gb(cfg.memory_gb))
    views = stored_views(train_stores)
    if views == 0:
        log.warning("%s: training sees clean images only, while the reference augments every visit (extract the "
                    "train split with --views K)", NO_VIEWS)
    val = place(load_split_features(val_index, val_stores, views=False), device)
    blocks = plan_blocks(train_stores, len(train_index.images), cfg.memory_gb)
    whole = place(load_split_features(train_index, train_stores), device) if len(blocks) == 1 else None
    present = present_images(train_stores, len(train_index.images))

    torch.manual_seed(cfg.seed)
    try:
        trainer = Trainer(cfg, build_model(dims, cfg), device)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if cfg.attention == "pyg":
        log.info("attention: PyG's GATv2Conv on the edge list")
    else:
        log.info("attention: %s", implementation(ATTENTION[cfg.attention], device, compute_dtype(cfg.precision)))
    history, best, best_epoch, bad_epochs = [], None, 0, 0
    if resumed:
        trainer.restore(resumed)
        history, best, best_epoch, bad_epochs = (resumed["history"], resumed["best_rsum"], resumed["best_epoch"],
                                                 resumed["bad_epochs"])
        log.info("resuming %s after epoch %d (best rsum %.2f at epoch %d)", run_dir, len(history), best, best_epoch)
        if len(history) >= cfg.epochs:
            log.warning("run %s has trained %d epochs already, --epochs is %d: nothing to train (pass a larger "
                        "--epochs to continue)", cfg.run, len(history), cfg.epochs)
        elif bad_epochs >= cfg.patience:
            log.warning("run %s stopped early: no better validation rsum for %d epochs, --patience is %d: nothing "
                        "to train (pass a larger --patience to continue)", cfg.run, bad_epochs, cfg.patience)
    elif init:
        trainer.init_from(init, cfg.init_momentum)
        log.info("initialised from run %s (epoch %d): encoders and ITM head", cfg.init, init["epoch"])
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"backbones": names, "dims": dims, "index_versions": versions, "store_settings": settings,
            "config": cfg.to_dict()}
    checkpoint.write_config(run_dir, {**meta, "device": str(device), "torch": torch.__version__})

    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if bad_epochs >= cfg.patience:
            log.info("early stop: no better validation rsum for %d epochs", bad_epochs)
            break
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # same epoch, same order: resumable
        plan = epoch_plan(train_index, present, blocks, views, cfg.batch_size, cfg.clean_prob, gen)
        try:
            row = run_epoch(trainer, epoch, plan, blocks, whole, train_index, train_stores, device)
        except NonFiniteLoss:
            raise PipelineError(nonfinite_loss_message(cfg, epoch, best_epoch)) from None
        row.update(trainer.model.learned())
        trainer.model.eval()
        row.update(recall_of(*encode_split(trainer.model, val, device, eval_batch_size(cfg)), val))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        improved = best is None or row["rsum"] >= best + cfg.min_improvement
        if improved:
            best, best_epoch, bad_epochs = row["rsum"], epoch, 0
        else:
            bad_epochs += 1
        state = {**trainer.state(), **meta, "epoch": epoch, "history": history, "best_rsum": best,
                 "best_epoch": best_epoch, "bad_epochs": bad_epochs}
        if improved:
            checkpoint.save(run_dir / "best.pt", state)
        checkpoint.save(run_dir / "last.pt", state)
        checkpoint.write_metrics(run_dir / "metrics.jsonl", history)
        plot_curves(history, run_dir / "curves.png")
        log.info("epoch %d: loss %.4f, val rsum %.2f%s, lr %.2e, temperature %.4f%s (%.1f s)", epoch, row["loss"],
                 row["rsum"], " (best)" if improved else "", row["lr"], row["temperature"],
                 f", w {row['w']:.3f}" if "w" in row else "", row["seconds"])
    return {"run": str(run_dir), "epochs": len(history), "best_rsum": best, "best_epoch": best_epoch,
            "history": history, "config": cfg}


class NonFiniteLoss(ArithmeticError):
    """A step's loss was NaN or inf: the epoch is abandoned before anything of it is saved."""


def nonfinite_loss_message(cfg: FuseConfig, epoch: int, best_epoch: int) -> str:
    """What the user can do: --resume keeps the run's --lr, so a lower one needs a new run."""
    kept = f"its checkpoints up to epoch {epoch - 1} are kept (best: epoch {best_epoch})" if epoch > 1 else \
        "nothing of it was saved"
    bf16 = (" Or resume it in full precision: `pipeline fuse --resume --run {run} --precision fp32`."
            .format(run=cfg.run_name) if cfg.precision == "bf16" else "")
    return (f"non-finite loss in epoch {epoch} of run {cfg.run_name}; stopped, and {kept}. A resumed run keeps its "
            f"--lr, so train a new run with a lower one, e.g. `pipeline fuse --run {cfg.run_name}-lr{cfg.lr / 4:g} "
            f"--lr {cfg.lr / 4:g}`" + (f" (add --init {cfg.run_name} to start from its best encoders)"
                                      if epoch > 1 else "") + f".{bf16}")


def run_epoch(trainer: Trainer, epoch: int, plan: list[Batch], blocks, whole, index, stores, device) -> dict:
    """One pass over the plan; the schedule steps after every iteration; returns the epoch's mean losses.

    Losses are summed on the device and read every ``CHECK_EVERY`` steps (no host sync per step); a non-finite
    loss stops the run at the next read, before anything of this epoch is saved.
    """
    trainer.model.train()
    totals, pairs, t0 = {}, 0, time.perf_counter()
    finite = torch.ones((), dtype=torch.bool, device=device)
    bar = Progress(f"epoch {epoch}", sum(len(b.captions) for b in plan), unit="pair", logger=log.name, leave=False)
    loaded = (None, whole)
    for i, batch in enumerate(plan):
        if whole is None and loaded[0] != batch.block:
            loaded = (batch.block, place(load_split_features(index, stores, blocks[batch.block]), device))
        id_start = blocks[batch.block][0] if whole is None else 0
        losses = trainer.step(loaded[1], batch, id_start, int(index.caption_offsets[id_start]))
        trainer.scheduler.step(epoch - 1 + i / len(plan))
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v * len(batch.captions)
        finite &= torch.isfinite(losses["loss"])
        pairs += len(batch.captions)
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == len(plan):
            if not bool(finite):
                bar.close()
                raise NonFiniteLoss(epoch)
            bar.update(0, loss=float(totals["loss"]) / pairs)
        bar.update(len(batch.captions))
    bar.close()
    seconds = time.perf_counter() - t0
    return {"epoch": epoch, **{k: float(v) / max(pairs, 1) for k, v in totals.items()},
            "lr": trainer.optimizer.param_groups[0]["lr"], "pairs_per_s": round(pairs / seconds, 1)}
