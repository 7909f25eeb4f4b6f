"""HADA's training losses: id-targeted contrastive (ITC), hard-negative sampling and matching (ITM).

Everything here computes in float32 (inputs are cast), so callers may hold
bfloat16 activations under autocast.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluate.weighted import mix_scores
from fuse import compiled


def id_targets(ids: Tensor, all_ids: Tensor) -> Tensor:
    """Soft ITC targets (N, M): every entry of ``all_ids`` equal to the row's id shares the row's mass equally
    (so every caption of an image is a positive). Negative ids (the queue's initial entries) never match."""
    pos = (ids.view(-1, 1) == all_ids.view(1, -1)) & (all_ids.view(1, -1) >= 0)
    pos = pos.to(torch.float32)
    # Rows always match themselves when ``all_ids`` starts with ``ids``; clamp guards the rest.
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets: Tensor) -> Tensor:
    """ALBEF's contrastive loss, (i2t + t2i) / 2, on temperature-scaled logits.

    Rows of both are the batch's pairs keyed by their image id, columns batch +
    queue entries, so one target matrix serves both directions.
    """
    return 0.5 * (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets))


def _itc_from_products(p_i2t: Tensor, p_t2i: Tensor, temp: Tensor, ids: Tensor, all_ids: Tensor,
                       first_i2t: Optional[Tensor], first_t2i: Optional[Tensor], w: Optional[Tensor]) -> Tensor:
    targets = id_targets(ids, all_ids)
    sim_i2t, sim_t2i = p_i2t / temp, p_t2i / temp
    if w is not None:
        sim_i2t, sim_t2i = mix_scores(sim_i2t, first_i2t / temp, w), mix_scores(sim_t2i, first_t2i / temp, w)
    return itc_loss(sim_i2t, sim_t2i, targets)


def itc_loss_from_products(p_i2t: Tensor, p_t2i: Tensor, temp: Tensor, ids: Tensor, all_ids: Tensor,
                           first: Optional[tuple[Tensor, Tensor]] = None, w: Optional[Tensor] = None,
                           impl: Optional[str] = None) -> Tensor:
    """:func:`itc_loss` of the products ``p`` (rows: the batch, columns: batch + queue) divided by ``temp``,
    with :func:`id_targets` of ``ids`` against ``all_ids``; in the weighted stage the logits are
    ``mix_scores(p / temp, first / temp, w)``.

    The same expressions, ``torch.compile``'d by default (``fuse.compiled``; ``impl`` as there): the eager
    version makes a dozen passes over (N, N + Q) tensors, each a fresh allocation, where the compiled one
    makes a few fused ones.
    """
    if (first is None) != (w is None):
        raise ValueError("the weighted ITC loss needs both the first backbone's products and w")
    args = (p_i2t, p_t2i, temp, ids, all_ids, *(first or (None, None)), w)
    ok, loss = compiled.try_compiled(impl, "loss.itc", _itc_from_products, *args)
    return loss if ok else _itc_from_products(*args)


def sample_hard_negatives(logits: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
    """One negative column per row, drawn with probability softmax(logits) over
    the columns not marked ``same`` (torch.multinomial, so seeded runs repeat).

    Returns (index (N,), has_negative (N,) bool). A row with every column
    ``same`` (e.g. the whole batch shows one image) has no negative: it draws
    uniformly so shapes stay static, and callers must drop it via ``has_negative``.
    """
    # Non-finite logits (a diverged step; the training loop stops at its next check) must not crash here.
    logits = torch.nan_to_num(logits.detach().float(), nan=0.0, posinf=1e4, neginf=-1e4)
    has_neg = ~same.all(dim=1)
    # Mask before the softmax: masking after it underflows to all-zero rows at small temperatures.
    logits = logits.masked_fill(same, float("-inf"))
    logits = torch.where(has_neg.unsqueeze(1), logits, torch.zeros_like(logits))
    probs = F.softmax(logits, dim=1)
    return torch.multinomial(probs, 1).squeeze(1), has_neg


def itm_features(a: Tensor, b: Tensor) -> Tensor:
    """The discriminator input [a, b, |a - b|, a * b]."""
    return torch.cat([a, b, (a - b).abs(), a * b], dim=-1)


def itm_loss(pos_logits: Tensor, neg_logits: Tensor, neg_valid: Tensor) -> Tensor:
    """Binary cross-entropy with logits: positives label 1, negatives 0; the mean
    runs over the positives and the valid negatives only."""
    logits = torch.cat([pos_logits.reshape(-1), neg_logits.reshape(-1)]).float()
    labels = torch.cat([torch.ones_like(pos_logits.reshape(-1)),
                        torch.zeros_like(neg_logits.reshape(-1))]).float()
    weight = torch.cat([torch.ones_like(pos_logits.reshape(-1)),
                        neg_valid.reshape(-1).to(pos_logits.dtype)]).float()
    loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum")
    return loss / weight.sum()
