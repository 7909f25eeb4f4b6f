"""QB-Norm and DBNorm: training-free hubness corrections that normalise scores against banks of train embeddings.

Both are built on the inverted softmax: a gallery item g's score for a query q is divided by how strongly g
attracts the members b of a bank, exp(beta s(q, g)) / sum_b exp(beta s(b, g)). It is computed in log space,
beta s(q, g) - LSE_b beta s(b, g), which ranks every query's candidates exactly as the ratio does. A hub (an
item close to many queries) has a large bank sum and is demoted.

* QB-Norm (Bogolin et al., CVPR 2022) with the dynamic inverted softmax (DIS): the bank holds train samples of
  the query modality. The activation set is the gallery items that some bank member retrieves in its top k
  (k = 1, the paper's default). A query whose best gallery item is in the activation set is normalised; every
  other query keeps its raw scores.
* DBNorm (Wang et al., EMNLP 2023) with the dual inverted softmax (DualIS): the product of two inverted
  softmaxes, one over a query bank (train samples of the query modality: cross-modal similarities, beta1) and
  one over a gallery bank (train samples of the gallery's modality: same-modality similarities, beta2), for
  every query: (beta1 + beta2) s(q, g) - LSE_b beta1 s(b, g) - LSE_b' beta2 s(b', g). Its dynamic variant
  (DualDIS) is not implemented here.

Directions: image->text queries are images and the gallery captions (query bank: train images; gallery bank:
train captions); text->image the reverse. Each beta is tuned per direction on val (the direction's R@1+R@5+R@10).
The banks are read block by block: memory is about 2 x bank_block x gallery x 4 bytes (``bank_block_rows``
leaves room for a third).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .recall import KS, _rows, recall_at_k, retrieval_ranks
from .topk import top_indices

BETAS = (1.0, 3.0, 10.0, 20.0, 30.0, 50.0, 100.0)  # the val grid (1/beta: temperatures 1 ... 0.01)
BETA = 20.0  # QB-Norm's default beta, used when there is no val split to tune on
TOP = 1  # QB-Norm's k: each bank member activates its top-1 gallery item
ACTIVE_ALL = {"all": [None]}  # the activation set over the whole gallery


@dataclass
class BankStats:
    """One gallery against one bank: ``lse[beta][g]`` = log sum_b exp(beta s(b, g)); ``active[name][g]``: item g
    is among the top ``TOP`` gallery items of some bank member, each member looking only within g's own part of
    the partition ``name``."""

    lse: dict[float, torch.Tensor]
    active: dict[str, torch.Tensor] = field(default_factory=dict)


def bank_block_rows(memory_bytes: int, n_gallery: int) -> int:
    """Bank rows per block so that a block's scores and their temporaries fit in ``memory_bytes``."""
    return max(1, min(65536, int(memory_bytes) // (12 * max(n_gallery, 1))))


def bank_stats(gallery: Any, bank: Any, betas: Sequence[float], partitions: dict[str, Sequence[torch.Tensor]] | None
               = None, top: int = TOP, bank_block: int = 4096, device: str | torch.device = "cpu",
               progress: Callable[[int], None] | None = None) -> BankStats:
    """Log partition sums of every gallery row against every bank row, and activation sets, in one bank pass.

    gallery, bank: embedding rows (numpy, torch, h5py or dask; read bank_block rows at a time). partitions:
    {name: [index tensors of gallery rows, one per part; None: the whole gallery]}, the activation sets to
    compute (QB-Norm's; ``ACTIVE_ALL`` for the whole gallery). The log-sum-exp runs online (a running max per
    gallery item), exact in float32. Results are on the CPU.
    """
    device = torch.device(device)
    n_bank = int(bank.shape[0])
    if n_bank == 0:
        raise ValueError("the bank is empty")
    g = _rows(gallery, 0, None, device)
    n = g.shape[0]
    parts = dict(partitions or {})
    active = {name: torch.zeros(n, dtype=torch.bool, device=device) for name in parts}
    peak = torch.full((n,), -math.inf, device=device)
    sums = {float(b): torch.zeros(n, device=device) for b in betas}
    for b0 in range(0, n_bank, bank_block):
        s = _rows(bank, b0, b0 + bank_block, device) @ g.T  # bank block x gallery
        new_peak = torch.maximum(peak, s.max(dim=0).values)
        buf = torch.empty_like(s)  # one temporary for every beta: memory stays about 2 x the block's scores
        for beta, acc in sums.items():
            torch.sub(s, new_peak, out=buf).mul_(beta).exp_()
            acc.mul_(torch.exp(beta * (peak - new_peak))).add_(buf.sum(dim=0))
        peak = new_peak
        for name, sets in parts.items():
            for idx in sets:
                scores = s if idx is None else s[:, idx]
                # top-1: argmax gives the first best, as top_indices would, in one cheap pass
                hits = scores.argmax(dim=1) if top == 1 else top_indices(scores, top).reshape(-1)
                active[name][hits if idx is None else idx.to(device)[hits]] = True
        if progress is not None:
            progress(s.shape[0])
    lse = {beta: (beta * peak + torch.log(acc)).cpu() for beta, acc in sums.items()}
    return BankStats(lse, {name: a.cpu() for name, a in active.items()})


def first_best(sims: torch.Tensor, dim: int) -> torch.Tensor:
    """Index of each query's best candidate along ``dim`` (the lowest among equals, as the ranks break ties).

    Along dim 0 of a row-major matrix, argmax is slow: the column maxima, then the first row holding each."""
    if dim == 1:
        return sims.argmax(dim=1)
    peak = sims.amax(dim=0)
    rows, cols = (sims == peak).nonzero().unbind(1)
    first = torch.full((sims.shape[1],), sims.shape[0], dtype=torch.long, device=sims.device)
    return first.scatter_reduce_(0, cols, rows, "amin")


def qbnorm_i2t(sims: torch.Tensor, beta: float, lse_captions: torch.Tensor, active_captions: torch.Tensor,
               best: torch.Tensor | None = None) -> torch.Tensor:
    """images x captions scores for image queries after the dynamic inverted softmax (captions' stats vs the
    train-image bank): beta s - lse for an image whose best caption is active, s for the others.
    best: ``first_best(sims, 1)`` when already known."""
    normalised = active_captions[first_best(sims, 1) if best is None else best].to(sims.dtype)
    out = sims * (1 + (beta - 1) * normalised)[:, None]
    return out.addr_(normalised, lse_captions.to(sims.dtype), alpha=-1)  # in place: no second full matrix


def qbnorm_t2i(sims: torch.Tensor, beta: float, lse_images: torch.Tensor, active_images: torch.Tensor,
               best: torch.Tensor | None = None) -> torch.Tensor:
    """images x captions scores for caption queries after the dynamic inverted softmax (images' stats vs the
    train-caption bank): beta s - lse for a caption whose best image is active, s for the others.
    best: ``first_best(sims, 0)`` when already known."""
    normalised = active_images[first_best(sims, 0) if best is None else best].to(sims.dtype)
    out = sims * (1 + (beta - 1) * normalised)[None, :]
    return out.addr_(lse_images.to(sims.dtype), normalised, alpha=-1)


def dbnorm_i2t(sims: torch.Tensor, betas: tuple[float, float], query_lse_captions: torch.Tensor,
               gallery_lse_captions: torch.Tensor) -> torch.Tensor:
    """images x captions scores for image queries after the dual inverted softmax: query bank = train images
    (its LSE at beta1), gallery bank = train captions (at beta2)."""
    return (sims * (betas[0] + betas[1])).sub_((query_lse_captions + gallery_lse_captions)[None, :])


def dbnorm_t2i(sims: torch.Tensor, betas: tuple[float, float], query_lse_images: torch.Tensor,
               gallery_lse_images: torch.Tensor) -> torch.Tensor:
    """images x captions scores for caption queries after the dual inverted softmax: query bank = train captions
    (at beta1), gallery bank = train images (at beta2)."""
    return (sims * (betas[0] + betas[1])).sub_((query_lse_images + gallery_lse_images)[:, None])


def _direction_sum(scores: torch.Tensor, text_to_image: Any, direction: str, ks: Sequence[int]) -> float:
    ranks = retrieval_ranks(scores, text_to_image, which=direction)[0 if direction == "i2t" else 1]
    return sum(recall_at_k(ranks, k) for k in ks)


def best_setting(candidates: Sequence, scores_for: Callable[[Any], torch.Tensor], text_to_image: Any,
                 direction: str, ks: Sequence[int] = KS):
    """The candidate whose scores give the best R@1+R@5+R@10 in ``direction`` (ties: the first)."""
    best, best_sum = None, -1.0
    for c in candidates:
        total = _direction_sum(scores_for(c), text_to_image, direction, ks)
        if total > best_sum:
            best, best_sum = c, total
    return best


def tune_qbnorm(sims_val: torch.Tensor, text_to_image_val: Any, captions: BankStats, images: BankStats,
                betas: Sequence[float] = BETAS) -> tuple[float, float]:
    """(beta for image->text, beta for text->image) with the best val recall in each direction.

    captions: the val captions against the train-image bank; images: the val images against the train-caption
    bank; both computed at every beta of ``betas``.
    """
    best_captions, best_images = first_best(sims_val, 1), first_best(sims_val, 0)  # the same for every beta
    i2t = best_setting(betas, lambda b: qbnorm_i2t(sims_val, b, captions.lse[b], captions.active["all"],
                                                   best_captions), text_to_image_val, "i2t")
    t2i = best_setting(betas, lambda b: qbnorm_t2i(sims_val, b, images.lse[b], images.active["all"], best_images),
                       text_to_image_val, "t2i")
    return i2t, t2i


def tune_dbnorm(sims_val: torch.Tensor, text_to_image_val: Any, query_captions: BankStats,
                gallery_captions: BankStats, query_images: BankStats, gallery_images: BankStats,
                betas: Sequence[float] = BETAS) -> tuple[tuple[float, float], tuple[float, float]]:
    """((beta1, beta2) for image->text, (beta1, beta2) for text->image), the best val recall on betas x betas.

    query_captions: val captions vs the train-image bank; gallery_captions: val captions vs the train-caption
    bank; query_images: val images vs the train-caption bank; gallery_images: val images vs the train-image bank.
    """
    grid = list(itertools.product(betas, betas))
    i2t = best_setting(grid, lambda b: dbnorm_i2t(sims_val, b, query_captions.lse[b[0]], gallery_captions.lse[b[1]]),
                       text_to_image_val, "i2t")
    t2i = best_setting(grid, lambda b: dbnorm_t2i(sims_val, b, query_images.lse[b[0]], gallery_images.lse[b[1]]),
                       text_to_image_val, "t2i")
    return i2t, t2i
