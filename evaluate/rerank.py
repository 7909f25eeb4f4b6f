"""Nearest Neighbor Normalization (Chowdhury et al., EMNLP 2024): training-free hubness correction of cached embeddings.

A candidate close to many reference queries (a "hub") is retrieved too often; NNN subtracts from every score
alpha times the mean of the candidate's top-k similarities to a reference bank of queries (the train split):
text->image uses a bank of captions to score each image, image->text a bank of images to score each caption.
Defaults alpha=0.75, k=16 are this project's choice (the authors tune both on held-out data; their library
defaults are weight 0.5, k 256): tune alpha on val with tune_alpha.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .recall import KS, _rows, recalls_from_ranks, retrieval_ranks

ALPHA, K = 0.75, 16
ALPHAS = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1


def hubness(candidates: Any, bank: Any, k: int = K, block: int = 4096, bank_block: int = 65536,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Mean of each candidate's k highest dot products with the bank rows (k capped at the bank size).

    Chunked over candidates and bank, keeping a running top-k, so memory is about block x (bank_block + k) floats.
    """
    n, n_bank = int(candidates.shape[0]), int(bank.shape[0])
    k = min(k, n_bank)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for c0 in range(0, n, block):
        cand, top = _rows(candidates, c0, c0 + block, device), None
        for b0 in range(0, n_bank, bank_block):
            s = cand @ _rows(bank, b0, b0 + bank_block, device).T
            s = s if top is None else torch.cat([top, s], dim=1)
            top = s.topk(min(k, s.shape[1]), dim=1).values
        out[c0:c0 + block] = top.mean(dim=1)
    return out


def _scores(image_embeds: Any, text_embeds: Any, image_bank: Any, text_bank: Any, k: int, device):
    """(raw scores, per-image hubness against the caption bank, per-caption hubness against the image bank)."""
    sims = _rows(image_embeds, 0, None, device) @ _rows(text_embeds, 0, None, device).T
    return sims, hubness(image_embeds, text_bank, k, device=device), hubness(text_embeds, image_bank, k, device=device)


def nnn_similarities(image_embeds: Any, text_embeds: Any, image_bank: Any, text_bank: Any, alpha: float = ALPHA,
                     k: int = K, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected images x captions scores (for_i2t, for_t2i).

    for_i2t: s(i, j) - alpha * hub(caption j vs image bank), the candidates being captions;
    for_t2i: s(i, j) - alpha * hub(image i vs caption bank), the candidates being images.
    """
    sims, b_img, b_txt = _scores(image_embeds, text_embeds, image_bank, text_bank, k, device)
    return sims - alpha * b_txt[None, :], sims.sub_(alpha * b_img[:, None])


def _ranks(sims: torch.Tensor, b_img: torch.Tensor, b_txt: torch.Tensor, alpha: float, text_to_image: Any):
    i2t, _ = retrieval_ranks(sims - alpha * b_txt[None, :], text_to_image, which="i2t")
    _, t2i = retrieval_ranks(sims - alpha * b_img[:, None], text_to_image, which="t2i")
    return i2t, t2i


def nnn_recall(image_embeds: Any, text_embeds: Any, text_to_image: Any, image_bank: Any, text_bank: Any,
               ks: Sequence[int] = KS, alpha: float = ALPHA, k: int = K,
               device: str | torch.device = "cpu") -> dict[str, float]:
    """retrieval_recall's dict after NNN (i2t from the caption-corrected scores, t2i from the image-corrected)."""
    sims, b_img, b_txt = _scores(image_embeds, text_embeds, image_bank, text_bank, k, device)
    return recalls_from_ranks(*_ranks(sims, b_img, b_txt, alpha, text_to_image), ks)


def tune_alpha(image_embeds_val: Any, text_embeds_val: Any, text_to_image_val: Any, image_bank: Any,
               text_bank: Any, alphas: Sequence[float] = ALPHAS, k: int = K, ks: Sequence[int] = KS,
               device: str | torch.device = "cpu", expand: Callable | None = None) -> float:
    """The alpha with the best val rsum (ties: the first in alphas); the biases are computed once. ``expand``:
    as in evaluate.late_fusion.tune_weights."""
    sims, b_img, b_txt = _scores(image_embeds_val, text_embeds_val, image_bank, text_bank, k, device)
    expand = expand or (lambda i2t, t2i: (i2t, t2i))
    best, best_rsum = None, -1.0
    for alpha in alphas:
        rsum = recalls_from_ranks(*expand(*_ranks(sims, b_img, b_txt, alpha, text_to_image_val)), ks)["rsum"]
        if rsum > best_rsum:
            best, best_rsum = alpha, rsum
    return best
