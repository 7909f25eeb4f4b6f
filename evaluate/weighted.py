"""HADA's weighted score (its second stage): (1 - w) * fused similarity + w * the first backbone's similarity.

One place for the formula: training mixes logits with ``mix_scores``; encoding writes ``mix_embeddings``,
whose plain dot products are ``mix_scores`` of the unit embeddings, so scoring needs nothing special.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mix_scores(fused: Tensor, first: Tensor, w: Tensor | float) -> Tensor:
    """(1 - w) * fused + w * first, elementwise (any shapes that broadcast)."""
    return (1.0 - w) * fused + w * first


def mix_embeddings(fused: Tensor, first: Tensor, w: float) -> Tensor:
    """[sqrt(1 - w) * fused, sqrt(w) * normalise(first)]: for unit ``fused`` rows, the dot product of two such
    rows is ``mix_scores`` of their cosines, and the rows stay unit length."""
    return torch.cat([math.sqrt(1.0 - w) * fused.float(), math.sqrt(w) * F.normalize(first.float(), dim=-1)], dim=-1)
