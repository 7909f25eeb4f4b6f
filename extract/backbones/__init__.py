"""The backbone registry: a name maps to a factory taking BackboneOptions; `pipeline backbones` lists them."""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

from data.errors import PipelineError
from extract.backbones.base import Backbone, BackboneOptions, Encoded, Tokenized

_REGISTRY: dict[str, tuple[Callable[[BackboneOptions], Backbone], str]] = {}


def register(name: str, summary: str):
    """Decorator: make a factory available under ``name``."""
    def wrap(factory):
        _REGISTRY[name] = (factory, summary)
        return factory
    return wrap


def available() -> dict[str, str]:
    _load_families()
    return {name: summary for name, (_, summary) in sorted(_REGISTRY.items())}


def create(name: str, options: BackboneOptions = BackboneOptions()) -> Backbone:
    """Build a backbone by name; weights are resolved here, before any work, and fail fast."""
    _load_families()
    if name not in _REGISTRY:
        raise PipelineError(f"unknown --backbone {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0](options)


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
    from extract.backbones import blip, clip  # noqa: F401


__all__ = ["Backbone", "BackboneOptions", "Encoded", "Tokenized", "available", "create", "load", "register"]
