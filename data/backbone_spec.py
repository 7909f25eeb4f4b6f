"""Backbone specs (what `--backbone` and `--backbones` take) and the store folder each one is cached in.

Grammar (no spaces, no commas)::

    spec    = family [":" model] ["@" weights]
    family  = a registered backbone family: blip, clip, blip2, open_clip, blip-tiny, ...
    model   = an open_clip model name (open_clip only), e.g. ViT-SO400M-14-SigLIP2-378
    weights = a pretrained tag, a Hugging Face id, hf-hub:<id>, or a local file or folder

Store name (the folder under ``<cache>/<dataset>/<split>/``), derived from the spec as written:
``family``, then ``.model`` if there is a model, then ``@`` and the weights' name if weights are named.
The weights' name is a local path's last component without its suffix, or else the reference with
``/`` and ``:`` turned into ``.``; any other character outside ``A-Z a-z 0-9 . _ - @`` becomes ``_``.
So ``open_clip:ViT-L-16-SigLIP2-384@webli`` is cached in ``open_clip.ViT-L-16-SigLIP2-384@webli`` and
``blip2@/models/blip2-coco/`` in ``blip2@blip2-coco``; plain names (``blip``, ``clip``) are unchanged.

A reference is named as a local path (``looks_like_path``) when it is absolute or starts with ``./``,
``../`` or ``~``, ends in a weights file's suffix, or has two or more ``/`` (a Hugging Face id is
``org/name``, one). So ``cache/demo-weights/x``, ``./cache/demo-weights/x`` and ``/abs/cache/demo-weights/x``
all name the store ``...@x``, while ``Salesforce/blip-itm-large-coco`` names ``...@Salesforce.blip-itm-large-coco``.
The rule is syntax only, so a store's name never depends on the folder a command runs in or on what is on
disk; where the weights are *read* from is decided when they are loaded (an ``org/name`` folder that exists
there is read as a folder, and keeps the ``org.name`` store name; write ``./org/name`` to name it ``name``).

Only syntax is checked here (no project package, no model library imported): whether the family
exists and takes a model or weights is the backbone registry's to say (extract/backbones).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from data.errors import PipelineError

_FAMILY = re.compile(r"[a-z][a-z0-9_-]*\Z")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}
GRAMMAR = "family[:model][@weights], e.g. blip, blip2@/path/to/folder, open_clip:ViT-L-16-SigLIP2-384@webli"


@dataclass(frozen=True)
class BackboneSpec:
    family: str
    model: str | None = None
    weights: str | None = None

    def __str__(self) -> str:
        return self.family + (f":{self.model}" if self.model else "") + (f"@{self.weights}" if self.weights else "")

    @property
    def store_name(self) -> str:
        """The store folder's name (see the module docstring for the rule)."""
        name = self.family + (f".{self.model}" if self.model else "")
        if self.weights:
            ref = self.weights.rstrip("/")
            if looks_like_path(self.weights):
                path = PurePath(ref)
                ref = path.stem if path.suffix in WEIGHT_SUFFIXES else path.name
            name += "@" + _UNSAFE.sub("_", ref.replace("/", ".").replace(":", ".")).strip(".")
        return name


def looks_like_path(ref: str) -> bool:
    """True for a reference to a local file or folder (see the module docstring for the rule)."""
    if ref.startswith("hf-hub:"):
        return False
    return (ref.startswith(("/", "./", "../", "~")) or PurePath(ref).suffix in WEIGHT_SUFFIXES
            or ref.strip("/").count("/") > 1)


def parse_spec(text: str) -> BackboneSpec:
    """One backbone spec, syntax checked; raises PipelineError naming the bad part."""
    text = (text or "").strip()
    if not text:
        raise PipelineError(f"empty backbone spec: write {GRAMMAR}")
    head, at, weights = text.partition("@")
    family, colon, model = head.partition(":")
    if at and not weights:
        raise PipelineError(f"backbone spec {text!r}: nothing after '@' (name the weights, or leave out the '@')")
    if "," in text:
        raise PipelineError(f"backbone spec {text!r}: a spec cannot hold a comma (commas separate specs)")
    if not _FAMILY.match(family):
        raise PipelineError(f"backbone spec {text!r}: {family!r} is not a backbone family name; write {GRAMMAR}")
    if colon and not _MODEL.match(model):
        raise PipelineError(f"backbone spec {text!r}: {model!r} is not a model name (letters, digits, . _ -)")
    return BackboneSpec(family, model or None, weights or None)


def parse_specs(text: str) -> list[BackboneSpec]:
    """Comma-separated specs (``--backbones``), each parsed."""
    return [parse_spec(part) for part in (text or "").split(",") if part.strip()]


def store_name(text: str) -> str:
    """The store folder's name for a spec as a user writes it."""
    return parse_spec(text).store_name
