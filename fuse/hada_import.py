"""`pipeline import-hada`: a HADA-LAVIS checkpoint (``best.pth.tar``) as a run of this project.

The reference saves ``{"img_encoder", "cap_encoder", "discriminator", "temp_para", "weight_1", "epoch",
"best_loss"}``; each encoder is ``Models.MH`` -> ``EnLiFu`` (keys ``enc.gcn.trans_{1,2}.linear.0.*``,
``enc.gcn.gcn.conv.0.*`` (a PyG GATv2Conv), ``enc.gcn.gcn.conv_lin.0.linear.0.*``, ``enc.lin.linear.0.*``) and
the discriminator ``disc.linear.0.*``. Widths and heads are read off the tensors; the run's stores must have the
matching node and embedding widths, and features made as the reference made them (fuse/provenance.py): a node layout
it never produced is refused, other weights, precision or captions are recorded in the run (and refused with
``--strict``). The published checkpoints were trained with the reference's forward bug, so ``--reference-bug`` is the
default here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from data.backbone_spec import parse_specs
from data.errors import PipelineError
from data.store import common_settings
from data.torch_files import load_pt
from fuse import checkpoint, provenance
from fuse.config import FuseConfig, ModelConfig
from fuse.data import open_stores, store_dims
from fuse.model import build_model

log = logging.getLogger("pipeline.fuse")

# Reference key (after the encoder prefix) -> this project's GraphEncoder key.
ENCODER_KEYS = {
    "enc.gcn.trans_1.linear.0.weight": "proj.0.linear.weight",
    "enc.gcn.trans_1.linear.0.bias": "proj.0.linear.bias",
    "enc.gcn.trans_2.linear.0.weight": "proj.1.linear.weight",
    "enc.gcn.trans_2.linear.0.bias": "proj.1.linear.bias",
    **{f"enc.gcn.gcn.conv.0.{k}": f"conv.{k}"
       for k in ("att", "bias", "lin_l.weight", "lin_l.bias", "lin_r.weight", "lin_r.bias", "lin_edge.weight")},
    "enc.gcn.gcn.conv_lin.0.linear.0.weight": "merge.linear.weight",
    "enc.gcn.gcn.conv_lin.0.linear.0.bias": "merge.linear.bias",
    "enc.lin.linear.0.weight": "out.linear.weight",
    "enc.lin.linear.0.bias": "out.linear.bias",
}
DISCRIMINATOR_KEYS = {"disc.linear.0.weight": "itm_head.linear.weight", "disc.linear.0.bias": "itm_head.linear.bias"}
SIDES = {"img_encoder": "image_encoder", "cap_encoder": "text_encoder"}


def read_reference_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, unpickled with ``weights_only=True`` and an allowlist of the numpy scalar types
    the reference may have saved (e.g. ``best_loss``); anything else is refused by name."""
    if not Path(path).is_file():
        raise PipelineError(f"no such checkpoint: {path}")
    # A numpy scalar pickles as numpy.core.multiarray.scalar under numpy 1 (the reference's era) and as
    # numpy._core.multiarray.scalar under numpy 2: both names are allowed, whichever numpy reads the file.
    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    scalars = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
               *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32))]
    state = load_pt(path, "HADA-LAVIS checkpoint", scalars)
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: not a HADA-LAVIS checkpoint (a {type(state).__name__}, not a dict)")
    missing = [k for k in ("img_encoder", "cap_encoder", "discriminator", "temp_para") if k not in state]
    if missing:
        raise PipelineError(f"{path}: not a HADA-LAVIS checkpoint (no {', '.join(missing)})")
    return state


def _mapped(part: dict, table: dict, what: str) -> dict:
    keys = set(part)
    unknown, missing = sorted(keys - set(table)), sorted(set(table) - keys)
    if unknown or missing:
        raise PipelineError(f"{what}: " + "; ".join(
            s for s in (f"unknown keys {unknown}" if unknown else "", f"missing keys {missing}" if missing else "")
            if s))
    return {table[k]: v.float() for k, v in part.items()}


def reference_state_to_model(state: dict) -> dict:
    """This project's ``HadaModel`` weights (online encoders, ITM head, temperature, w) from a reference
    checkpoint; keys are checked exactly."""
    out = {}
    for ref, ours in SIDES.items():
        out.update({f"{ours}.{k}": v for k, v in _mapped(state[ref], ENCODER_KEYS, ref).items()})
    out.update(_mapped(state["discriminator"], DISCRIMINATOR_KEYS, "discriminator"))
    out["temp"] = torch.as_tensor(state["temp_para"], dtype=torch.float32).reshape(())
    weight = state.get("weight_1", 0)
    out["w"] = torch.as_tensor(float(weight.detach()) if torch.is_tensor(weight) else ModelConfig.weight_init,
                               dtype=torch.float32).reshape(())
    return out


def infer_dims(weights: dict) -> dict:
    """Widths read off the tensors: node width, heads, embedding size, per-side input dims."""
    att = weights["image_encoder.conv.att"]  # (1, heads, width)
    heads, width = int(att.shape[1]), int(att.shape[2])
    dims = {"width": width, "heads": heads, "embed_dim": int(weights["image_encoder.out.linear.weight"].shape[0])}
    for side in ("image", "text"):
        dims[f"{side}_tokens"] = [int(weights[f"{side}_encoder.proj.{b}.linear.weight"].shape[1]) for b in (0, 1)]
        dims[f"{side}_readout_in"] = int(weights[f"{side}_encoder.out.linear.weight"].shape[1])
    return dims


def import_hada(path: str, dataset: str, backbones: str, run: str, cache: str = "cache", runs: str = "runs",
                weighted: bool | None = None, reference_bug: bool = True, strict: bool = False) -> Path:
    """Write ``<runs>/<run>/`` (config.json, best.pt) from a HADA-LAVIS checkpoint; nothing is written on error."""
    names = [spec.store_name for spec in parse_specs(backbones)]  # as `pipeline fuse` names them
    if len(names) != 2:
        raise PipelineError(f"--backbones {backbones!r}: a HADA-LAVIS checkpoint fuses exactly two backbones")
    run_dir = Path(runs) / run
    if (run_dir / "config.json").exists():
        raise PipelineError(f"run {run_dir} exists: choose another --run NAME")
    state = read_reference_checkpoint(Path(path))
    weights = reference_state_to_model(state)
    dims = infer_dims(weights)
    if weighted is None:
        weighted = torch.is_tensor(state.get("weight_1"))
    model_cfg = ModelConfig(width=dims["width"], heads=dims["heads"], embed_dim=dims["embed_dim"],
                            weighted=weighted, reference_bug=reference_bug)
    cfg = FuseConfig(dataset=dataset, backbones=",".join(names), cache=cache, runs=runs, run=run, model=model_cfg)
    stored, versions, by_split, facts, most_captions = {}, {}, {}, [], 0
    for split in ("val", "test"):  # the dims and settings of the cached eval splits (the same for both)
        try:
            index, stores = open_stores(cache, dataset, split, names)
        except PipelineError:
            continue
        versions[split], by_split[split] = index.version, stores
        stored = store_dims(stores)
        facts.append([provenance.store_facts(n, s) for n, s in zip(names, stores)])
        most_captions = max(most_captions, int(np.diff(index.caption_offsets).max(initial=0)))
    if not stored:
        raise PipelineError(f"no val or test split of {dataset!r} is cached for {', '.join(names)} in {cache}: "
                            f"run `pipeline extract` first")
    settings = common_settings(names, by_split)
    problems = []
    for side in ("image", "text"):
        if stored[f"{side}_tokens"] != dims[f"{side}_tokens"]:
            problems.append(f"{side} node widths: checkpoint {dims[f'{side}_tokens']}, stores "
                            f"{stored[f'{side}_tokens']}")
        need = 2 * dims["width"] + sum(stored[f"{side}_embeds"])
        if need != dims[f"{side}_readout_in"]:
            problems.append(f"{side} output layer takes {dims[f'{side}_readout_in']} inputs, the stores' "
                            f"embeddings make {need}")
    if problems:
        raise PipelineError(f"{path} does not fit backbones {', '.join(names)}: " + "; ".join(problems))
    caveats = provenance.check(facts, dataset, most_captions, strict)
    try:
        model = build_model(stored, cfg)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    model.load_partial(weights, momentum=True)
    epoch = int(state.get("epoch", 0))
    meta = {"backbones": names, "dims": stored, "index_versions": versions, "store_settings": settings,
            "config": cfg.to_dict(), "imported_from": str(path), "epoch": epoch}
    saved = {"model": model.state_dict(), **meta, "history": [], "best_rsum": None, "best_epoch": epoch,
             "bad_epochs": 0}
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save(run_dir / "best.pt", saved)
    checkpoint.write_config(run_dir, {**meta, "provenance": caveats})
    for caveat in caveats:
        log.warning("%s: %s", provenance.LABEL, caveat)
    log.info("imported %s as run %s (width %d, %d heads, embed %d, weighted %s, reference bug %s)", path, run_dir,
             dims["width"], dims["heads"], dims["embed_dim"], weighted, reference_bug)
    return run_dir
