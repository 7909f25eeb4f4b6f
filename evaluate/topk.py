"""Each query's K best candidates, in the order the recall metric ranks them, from scores or embeddings.

The order is the one of ``recall.retrieval_ranks``: score descending, then candidate index ascending. It is
exact with ties: the K-th best score of a row is found first, then every candidate at least as good is
ordered by (score, index).
"""
from __future__ import annotations

from typing import Any

import torch

from .recall import DIRECTIONS, _rows, _tensor


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of x (queries x candidates), the indices of its k best candidates, best first, ties by index."""
    n = x.shape[1]
    k = min(k, n)
    if not torch.isfinite(x.sum()) and torch.isnan(x).any():  # the sum rules NaN out cheaply
        raise ValueError("similarity scores contain NaN")
    x = x.contiguous()  # topk along strided rows is several times slower
    values, idx = x.topk(min(k + 1, n), dim=1)
    if n > k:
        tied = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)  # rows whose k-th score recurs beyond k
        ahead = int((x[tied] >= values[tied, k - 1:k]).sum(1).max()) if tied.numel() else k
        values, idx = (values[:, :k], idx[:, :k]) if ahead == k else x.topk(ahead, dim=1)
    by_index = idx.argsort(dim=1)
    idx, values = idx.gather(1, by_index), values.gather(1, by_index)
    by_score = values.argsort(dim=1, descending=True, stable=True)  # stable: equal scores keep index order
    return idx.gather(1, by_score)[:, :k]


def top_k(sims: Any, k: int, which: str = "both", block: int = 2048) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(i2t, t2i) of an images x captions score matrix: i2t[i] the k best captions of image i, t2i[j] the k best
    images of caption j (int64 tensors; None for the direction not asked). block: queries per step."""
    if which not in DIRECTIONS:
        raise ValueError(f"which must be one of {DIRECTIONS}, not {which!r}")
    s = _tensor(sims)
    i2t = t2i = None
    if which in ("both", "i2t"):
        i2t = torch.cat([top_indices(s[a:a + block], k) for a in range(0, s.shape[0], block)])
    if which in ("both", "t2i"):
        t2i = torch.cat([top_indices(s[:, a:a + block].T, k) for a in range(0, s.shape[1], block)])
    return i2t, t2i


def top_k_from_embeddings(image_embeds: Any, text_embeds: Any, k: int, block: int = 2048,
                          device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """top_k of image_embeds @ text_embeds.T, one block of queries at a time (float32 math; results on the CPU).

    Memory: about block x (the other side's rows) x 4 bytes, plus both sides' embeddings.
    """
    device = torch.device(device)
    images, texts = _rows(image_embeds, 0, None, device), _rows(text_embeds, 0, None, device)
    i2t = [top_indices(images[a:a + block] @ texts.T, k).cpu() for a in range(0, images.shape[0], block)]
    # Captions' scores as images @ texts.T computes them (the same products as the i2t side and the recall).
    t2i = [top_indices((images @ texts[a:a + block].T).T, k).cpu() for a in range(0, texts.shape[0], block)]
    return torch.cat(i2t), torch.cat(t2i)
