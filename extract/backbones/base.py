"""The contract every backbone meets: preprocessing, tokenizer, and image/text encoders."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from data.errors import PipelineError


@dataclass(frozen=True)
class BackboneOptions:
    """What a user can choose about a backbone on the command line."""

    checkpoint: str | None = None  # --checkpoint: where the weights are read from (overrides `weights`)
    # the spec's @weights: HF id / folder (BLIP, BLIP-2); tag / file / folder / hf-hub:id (open_clip)
    weights: str | None = None
    processor: str | None = None  # --processor: tokenizer / image processor for a .pth (HF id or folder)
    model: str | None = None  # open_clip architecture name (`clip --model`, or the model of an open_clip: spec)
    dataset: str = "coco"  # picks the fine-tuned default checkpoint where there is one
    tokens: bool = False  # token nodes for backbones that give only a global node by default (CLIP)
    download: bool = False  # allow network access for weights; otherwise only local files


@dataclass
class Encoded:
    """A batch through a backbone: raw projections and node features (row 0 = global node)."""

    proj: torch.Tensor  # B x D, unnormalised retrieval projection
    tokens: torch.Tensor  # B x T x W, padded for texts
    lengths: torch.Tensor | None = None  # B, valid rows per text (None: all T rows are valid)
    queries: torch.Tensor | None = None  # B x Q x D, one unnormalised projection per query (BLIP-2 images)


@dataclass
class Tokenized:
    inputs: dict[str, torch.Tensor]
    truncated: int  # captions cut to the encoder's length limit
    node_rows: torch.Tensor  # graph nodes each caption will have (its token rows stored)


class Backbone(abc.ABC):
    """One frozen retrieval model. Subclasses set ``module`` (the torch model) in ``__init__``."""

    name: str
    module: torch.nn.Module
    image_size: int

    @abc.abstractmethod
    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalised tensor, as the model was evaluated."""

    @abc.abstractmethod
    def train_transform(self) -> Callable[[Image.Image, np.random.Generator], torch.Tensor]:
        """(PIL image, generator) -> augmented tensor, as HADA-LAVIS trains (extract.augment.TrainView).

        Every random draw comes from the generator, never from global state (threads share the process).
        """

    @abc.abstractmethod
    def tokenize(self, captions: list[str]) -> Tokenized: ...

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> Encoded: ...

    @abc.abstractmethod
    def encode_texts(self, inputs: dict[str, torch.Tensor]) -> Encoded: ...

    @abc.abstractmethod
    def describe(self) -> dict:
        """Everything that changes the features: written into every shard and the store's fingerprint."""

    @property
    def patch_grid(self) -> int:
        """Side of the square patch grid behind image rows 1.. (0 when there are no patch rows)."""
        return 0

    def image_rows(self, token_pool: int = 1) -> int:
        """Node rows stored per image: the global node plus the patch grid pooled by ``token_pool``."""
        pooled = -(-self.patch_grid // token_pool) if self.patch_grid else 0
        return 1 + pooled * pooled

    @property
    def queries_per_image(self) -> int:
        """Rows of ``query_embeds`` stored per image (0: the backbone scores with one embedding per image)."""
        return 0

    def to(self, device: torch.device) -> "Backbone":
        self.module.to(device).eval().requires_grad_(False)
        return self


def weights_flag(spec: str, options: BackboneOptions) -> str:
    """Where messages say a backbone's weights were named: ``--checkpoint``, else the spec's @weights (``--backbone
    blip2@``, also for default weights, which could be named there); ``named`` joins it to the reference."""
    return "--checkpoint" if options.checkpoint else f"--backbone {spec}@"


def named(flag: str, ref: str) -> str:
    """A weights reference as it was written: ``--checkpoint REF`` or ``--backbone blip2@REF``."""
    return f"{flag}{ref}" if flag.endswith("@") else f"{flag} {ref}"


def missing_weights(what: str, where: str, flag: str, kind: str = "weights") -> PipelineError:
    """The one message for weights (or another ``kind`` of file) that cannot be had offline."""
    point = f"{flag}<folder> or --checkpoint" if flag.endswith("@") else flag
    return PipelineError(
        f"{kind} {what} not found ({where}). Point {point} at a local copy, or pass --download "
        f"to fetch them (needs network access).")
