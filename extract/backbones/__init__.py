"""The backbone registry: a family name maps to a factory taking BackboneOptions; `pipeline backbones` lists them.

``create`` takes a backbone spec (data/backbone_spec.py: ``family[:model][@weights]``), checks it against the
family (whether it takes a model name or weights), and builds the backbone, named after the spec.
"""
from __future__ import annotations

import difflib
import functools
import threading
from dataclasses import dataclass, replace
from typing import Callable

import torch

from data.backbone_spec import parse_spec
from data.errors import PipelineError
from extract.backbones.base import Backbone, BackboneOptions, Encoded, Tokenized


@dataclass(frozen=True)
class Family:
    factory: Callable[[BackboneOptions], Backbone]
    summary: str
    model: bool = False  # the spec names a model: family:model (required)
    weights: bool = False  # the spec may name weights: family@weights (tiny random-init families may not)
    needs_weights: bool = False  # and must have them, there or from --checkpoint (no default weights)
    model_option: bool = False  # --model picks the architecture inside the family's one store (clip)
    processor: bool = False  # --processor names its tokenizer / image processor (weights that hold none: a .pth)


_REGISTRY: dict[str, Family] = {}


def register(name: str, summary: str, model: bool = False, weights: bool = False, needs_weights: bool = False,
             model_option: bool = False, processor: bool = False):
    """Decorator: make a factory available under the family ``name``."""
    def wrap(factory):
        _REGISTRY[name] = Family(factory, summary, model, weights, needs_weights, model_option, processor)
        return factory
    return wrap


def families() -> dict[str, Family]:
    _load_families()
    return dict(sorted(_REGISTRY.items()))


def available() -> dict[str, str]:
    """Each family's spec syntax and summary."""
    out = {}
    for name, fam in families().items():
        weights = "@<weights>" if fam.needs_weights else "[@<weights>]" if fam.weights else ""
        syntax = name + (":<model>" if fam.model else "") + weights
        out[syntax] = fam.summary
    return out


def check(spec: str, model_option: str | None = None):
    """(parsed spec, family) if ``spec`` names a registered family in a form it takes; else a clear error."""
    parsed = parse_spec(spec)
    fams = families()
    family = fams.get(parsed.family)
    if family is None:
        close = difflib.get_close_matches(parsed.family, fams, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PipelineError(f"unknown backbone {parsed.family!r} in --backbone {spec}{hint}: choose one of "
                            f"{', '.join(fams)} (see `pipeline backbones`)")
    if family.model and not parsed.model:
        raise PipelineError(f"--backbone {spec}: name the model, as {parsed.family}:<model> (see `pipeline backbones`)")
    if parsed.model and not family.model:
        raise PipelineError(f"--backbone {spec}: {parsed.family} takes no model name after ':'")
    if parsed.weights and not family.weights:
        raise PipelineError(f"--backbone {spec}: {parsed.family} is random-initialised and takes no weights after '@'")
    if model_option and not family.model_option:
        raise PipelineError(f"--model applies to the clip backbone only; for another open_clip model write "
                            f"--backbone open_clip:{model_option}")
    return parsed, family


def create(spec: str, options: BackboneOptions = BackboneOptions()) -> Backbone:
    """Build a backbone from its spec; weights are resolved here, before any work, and fail fast."""
    parsed, family = check(spec, options.model)
    options = replace(options, model=parsed.model or options.model, weights=parsed.weights)
    backbone = family.factory(options)
    backbone.name = str(parsed)
    return backbone


_LOADING = threading.Lock()


def load(name: str, options: BackboneOptions, device: torch.device) -> Backbone:
    """The backbone on ``device``, built once per process and shared by every shard (and thread) that runs there."""
    with _LOADING:  # two threads asking at once get one model, not two
        return _loaded(name, options, str(device))


@functools.lru_cache(maxsize=2)
def _loaded(name: str, options: BackboneOptions, device: str) -> Backbone:
    return create(name, options).to(torch.device(device))


def _load_families() -> None:
    # Imported on demand so that listing or importing the registry costs nothing until used.
    from extract.backbones import albef, blip, blip2, clip  # noqa: F401


__all__ = ["Backbone", "BackboneOptions", "Encoded", "Tokenized", "available", "check", "create", "families", "load",
           "register"]
