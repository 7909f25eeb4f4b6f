"""Contrastive training of the demo's two tiny backbones, each on its own view of the scenes (data.demo.VIEWS).

`blip-demo` (blip-tiny's architecture and classes) learns from captions that are true only in colours,
positions and background; `clip-demo` (clip-tiny's) from captions true only in shapes, sizes and the
number of shapes. The other words still appear, redrawn at random, so each model reads the demo's real
captions at test time but has learnt to use only its half. Each starts from its tiny random
initialisation and trains a fixed number of steps on the demo's train split, seeded and single-threaded
(deterministic on a CPU). The weights are written as downloaded ones are (a ``save_pretrained`` folder; an
open_clip weights file beside its ``open_clip_config.json``) and read back through ``--checkpoint``.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from data.atomic import read_json, write_json
from data.demo import demo_dir, demo_scenes, view_captions
from data.device import one_torch_thread
from data.errors import PipelineError
from extract.reader import load_rgb

log = logging.getLogger("pipeline.demo")
TRAINING_RECORD = "demo_training.json"


@dataclass(frozen=True)
class Recipe:
    view: str  # a key of data.demo.VIEWS
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    temperature: float = 0.07
    seed: int = 0


RECIPES = {"blip-demo": Recipe("colours"), "clip-demo": Recipe("shapes")}


def identity(recipe: Recipe, data_root: str | Path) -> dict:
    """What trained weights depend on: the recipe and the generated data's parameters."""
    data = read_json(demo_dir(data_root) / "dataset_demo.json")["demo_params"]
    return {"recipe": asdict(recipe), "demo_params": data}


def demo_weights(name: str, data_root: str | Path, folder: str | Path, steps: int | None = None) -> Path:
    """Train ``name`` on the demo's train split into ``folder`` (reused when made by the same recipe and data)."""
    recipe = replace(RECIPES[name], **({"steps": steps} if steps else {}))
    folder = Path(folder)
    stamp = {"backbone": name, **identity(recipe, data_root)}
    record = folder / TRAINING_RECORD
    if record.is_file() and {k: read_json(record).get(k) for k in stamp} == stamp:
        return folder
    backbone = fresh_backbone(name)
    t0 = time.perf_counter()
    with one_torch_thread():  # tiny models train fastest so, and the weights do not depend on the core count
        losses = train(backbone, recipe, data_root)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(backbone, tmp)
    write_json(tmp / TRAINING_RECORD, {**stamp, "seconds": round(time.perf_counter() - t0, 1),
                                       "loss_first_50": float(np.mean(losses[:50])),
                                       "loss_last_50": float(np.mean(losses[-50:]))})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # complete or absent: the record inside is written last, before the rename
    log.info("%s trained on the %s view in %.0f s (loss %.2f -> %.2f): %s", name, recipe.view,
             time.perf_counter() - t0, np.mean(losses[:50]), np.mean(losses[-50:]), folder)
    return folder


def fresh_backbone(name: str):
    """The random-initialised tiny backbone a demo backbone starts from."""
    if name == "blip-demo":
        from extract.backbones.blip import random_tiny_blip

        return random_tiny_blip(name)
    from extract.backbones.clip import random_tiny_clip

    return random_tiny_clip(name)


def train(backbone, recipe: Recipe, data_root: str | Path) -> list[float]:
    """Symmetric InfoNCE over in-batch pairs of (image, one caption of the recipe's view); returns the losses."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    scenes = demo_scenes(data_root, "train")
    transform = backbone.eval_transform()
    images = demo_dir(data_root) / "images"
    pixels = torch.stack([transform(load_rgb(images / name)) for name, _ in scenes])
    module = backbone.module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    labels = torch.arange(recipe.batch_size)
    losses = []
    for _ in range(recipe.steps):
        rows = rng.choice(len(scenes), size=recipe.batch_size, replace=False)
        captions = [view_captions(rng, scenes[r][1], recipe.view)[int(rng.integers(5))] for r in rows]
        img = F.normalize(backbone.encode_images(pixels[rows]).proj, dim=-1)
        txt = F.normalize(backbone.encode_texts(backbone.tokenize(captions).inputs).proj, dim=-1)
        logits = img @ txt.T / recipe.temperature
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    module.eval()
    return losses


def save(backbone, folder: Path) -> None:
    """Write the weights the way the real ones are distributed, so --checkpoint reads them back."""
    folder.mkdir(parents=True)
    if hasattr(backbone, "processor"):  # BLIP: a save_pretrained folder
        for part in (backbone.module, backbone.tokenizer, backbone.processor):
            part.save_pretrained(folder)
        return
    from extract.backbones.clip import TINY_MODEL

    weights = {k: v.contiguous() for k, v in backbone.module.state_dict().items()}
    save_file(weights, folder / "open_clip_model.safetensors")
    write_json(folder / "open_clip_config.json", {
        "model_cfg": open_clip.get_model_config(TINY_MODEL),
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"}})


def missing_demo_weights(name: str) -> PipelineError:
    """The refusal of a demo backbone named without its weights: where `pipeline demo` writes them (weights_folder)."""
    return PipelineError(f"{name} needs the weights `pipeline demo` trains, which it writes to "
                         f"<cache>/demo-weights/{name}-<hash>/: write {name}@<that folder> or pass --checkpoint "
                         f"<that folder>")


def weights_folder(cache: str | Path, name: str, data_root: str | Path) -> Path:
    """Where ``pipeline demo`` keeps a demo backbone's weights: named by its recipe and data, so a changed recipe
    gets a new folder (and stores extracted with the old weights are refused, not silently reused)."""
    import hashlib

    key = json.dumps(identity(RECIPES[name], data_root), sort_keys=True)
    return Path(cache) / "demo-weights" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
