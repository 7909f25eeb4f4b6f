"""Settings of a run that continues (``--resume``) or starts from (``--init``) a saved one.

Options left out on the command line take the saved run's values (and the log says so); an option given
with a value that would silently make another model is refused with one line naming it, its saved value and
its new one. Resuming may change only how long and where it runs; a second stage (``--init``) may change its
own recipe, but not the backbones, the dataset or the shapes of the weights it loads.
"""
from __future__ import annotations

import logging

from data.backbone_spec import parse_specs
from data.errors import PipelineError
from data.options import flag, from_options, option_fields
from fuse.config import FuseConfig

log = logging.getLogger("pipeline.fuse")

# What a resumed run may change: when it stops, where it runs, where it reads and writes.
RESUME_FREE = frozenset({"epochs", "patience", "min_improvement", "device", "precision", "attention", "memory_gb",
                         "cache", "runs", "resume", "run"})
# What a resumed run may change, but keeps from the saved run when left out: the memory budget decides whether
# the train split is streamed in blocks, and so the order of the batches.
RESUME_STICKY = frozenset({"memory_gb"})
# What a second stage may not change: it loads these weights and features.
INIT_FIXED = frozenset({"dataset", "backbones", "width", "heads", "embed_dim"})
# Model settings a second stage takes from its first unless given (the reference's C1_cont repeats C1's).
INIT_ADOPTED = frozenset({"dataset", "backbones", "width", "heads", "dropout", "embed_dim", "w_token_own",
                          "w_token_other", "w_global", "self_loop_weight", "momentum", "queue_size", "temp",
                          "reference_bug"})


def flat(cfg: FuseConfig) -> dict:
    """{option name: value} over every option, the model's included."""
    values = cfg.to_dict()
    values.update(values["model"])
    return {f.name: values[f.name] for f, _ in option_fields(FuseConfig)}


def settle_config(cfg: FuseConfig, saved: dict, given: frozenset[str] | None, mode: str) -> FuseConfig:
    """The config to run with: ``cfg`` reconciled with a saved run's config (``mode`` "resume" or "init")."""
    old = flat(FuseConfig.from_dict(saved))
    new = flat(cfg)
    given = frozenset(new) if given is None else given
    if mode == "resume":
        fixed = {k for k in new if k not in RESUME_FREE}
        keep = fixed | RESUME_STICKY
    else:
        keep, fixed = INIT_ADOPTED, INIT_FIXED
    changed = [k for k in sorted(keep & given) if new[k] != old[k]]
    refused = [k for k in changed if k in fixed and not (k == "backbones" and _same_backbones(new[k], old[k]))]
    if refused:
        what = "resumed" if mode == "resume" else "loaded with --init"
        raise PipelineError("; ".join(f"{flag(k)}: the run {what} has {old[k]!r}, now {new[k]!r}" for k in refused)
                            + " (leave the option out to keep the saved value)")
    adopted = {k: old[k] for k in sorted(keep - given) if new[k] != old[k]}
    if adopted:
        log.info("%s: keeping the saved run's %s", mode, ", ".join(f"{flag(k)} {v!r}" for k, v in adopted.items()))
    for k in changed:
        log.info("%s: %s %r (the saved run had %r)", mode, flag(k), new[k], old[k])
    return from_options(FuseConfig, {**new, **adopted})


def _same_backbones(a: str | None, b: str | None) -> bool:
    return [str(s) for s in parse_specs(a)] == [str(s) for s in parse_specs(b)]
