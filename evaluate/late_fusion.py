"""Training-free baseline: a weighted sum of per-query standardised similarity matrices, weights tuned on val."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .recall import KS, _tensor, recalls_from_ranks, retrieval_ranks

# Candidate axis per direction: i2t queries are images (rows), so z-score along captions (dim 1);
# t2i queries are captions (columns), so z-score along images (dim 0).
CANDIDATE_DIM = {"i2t": 1, "t2i": 0}


def standardise(sims: Any, dim: int) -> torch.Tensor:
    """Z-score sims along dim, the candidate axis (dim=1: each row/image query; dim=0: each column/caption query).

    A query whose scores are all equal gets zeros. float64 stays float64, anything else becomes float32.
    """
    s = _tensor(sims)
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    std, mean = torch.std_mean(s, dim=dim, correction=0, keepdim=True)
    return (s - mean) / torch.where(std > 0, std, torch.ones_like(std))


def _fuse(standardised: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = None
    for z, w in zip(standardised, weights):
        if w:  # a zero weight costs nothing (and 0 * inf would be NaN)
            out = z * w if out is None else out.add_(z, alpha=w)
    if out is None:
        raise ValueError("at least one weight must be non-zero")
    return out


def _standardised(sims_list: Sequence[Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([standardise(s, CANDIDATE_DIM["i2t"]) for s in sims_list],
            [standardise(s, CANDIDATE_DIM["t2i"]) for s in sims_list])


def _check(sims_list: Sequence[Any], weights: Sequence[float]) -> None:
    if len(sims_list) != len(weights) or not sims_list:
        raise ValueError(f"{len(sims_list)} matrices for {len(weights)} weights")


def _fused_ranks(z_rows: Sequence[torch.Tensor], z_cols: Sequence[torch.Tensor], weights: Sequence[float],
                 text_to_image: Any):
    i2t, _ = retrieval_ranks(_fuse(z_rows, weights), text_to_image, which="i2t")
    _, t2i = retrieval_ranks(_fuse(z_cols, weights), text_to_image, which="t2i")
    return i2t, t2i


def late_fusion_similarities(sims_list: Sequence[Any], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(for_i2t, for_t2i) fused images x captions scores: the row-standardised sum ranks captions for each image,
    the column-standardised one images for each caption."""
    _check(sims_list, weights)
    z_rows, z_cols = _standardised(sims_list)
    return _fuse(z_rows, weights), _fuse(z_cols, weights)


def late_fusion_ranks(sims_list: Sequence[Any], weights: Sequence[float], text_to_image: Any):
    """(i2t ranks, t2i ranks) of the fused scores: i2t from the row-standardised sum, t2i from the column one."""
    _check(sims_list, weights)
    return _fused_ranks(*_standardised(sims_list), weights, text_to_image)


def late_fusion_recall(sims_list: Sequence[Any], weights: Sequence[float], text_to_image: Any,
                       ks: Sequence[int] = KS) -> dict[str, float]:
    """retrieval_recall's dict for the late fusion of images x captions matrices sims_list with weights."""
    return recalls_from_ranks(*late_fusion_ranks(sims_list, weights, text_to_image), ks)


def weight_grid(n: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """All weight vectors of length n on the simplex (>= 0, sum 1) with the given step.

    Order: lexicographically descending, so (1, 0, ...) comes first and the last matrix gains weight last.
    """
    units = round(1 / step)
    if n < 1 or abs(units * step - 1) > 1e-9:
        raise ValueError(f"need n >= 1 and a step dividing 1, got n={n}, step={step}")

    def parts(total: int, k: int):
        if k == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in parts(total - first, k - 1):
                yield (first,) + rest

    return [tuple(u / units for u in p) for p in parts(units, n)]


def tune_weights(sims_list_val: Sequence[Any], text_to_image_val: Any, step: float = 0.1,
                 ks: Sequence[int] = KS, expand: Callable | None = None) -> tuple[float, ...]:
    """The weight_grid point with the best val rsum; ties go to the first in weight_grid's order.

    ``expand``: maps the ranks of the rows scored to the split's (evaluate.coverage.Coverage.expand, so that
    images excluded at extraction count as misses, as in the table)."""
    z_rows, z_cols = _standardised(sims_list_val)
    expand = expand or (lambda i2t, t2i: (i2t, t2i))
    best, best_rsum = None, -1.0
    for w in weight_grid(len(sims_list_val), step):
        rsum = recalls_from_ranks(*expand(*_fused_ranks(z_rows, z_cols, w, text_to_image_val)), ks)["rsum"]
        if rsum > best_rsum:
            best, best_rsum = w, rsum
    return best
