"""Recall when some images were excluded at extraction (--skip-bad): they and their captions count as misses."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from evaluate.recall import KS, recalls_from_ranks, retrieval_ranks


def ranks_with_missing(sims_present: Any, present: Sequence[int], text_to_image: Any,
                       n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(i2t ranks per image, t2i ranks per caption) in index order from the present images' rows only.

    sims_present: len(present) x captions scores, rows in the order of ``present`` (image ids). An absent
    image gets i2t rank n_captions; a caption of an absent image gets t2i rank n_images: misses at any K
    below those, never dropped from the denominators.
    """
    sims = torch.as_tensor(np.asarray(sims_present) if not torch.is_tensor(sims_present) else sims_present)
    present = np.asarray(present, dtype=np.int64)
    t2i = np.asarray(text_to_image, dtype=np.int64)
    n_texts = sims.shape[1]
    if len(present) == n_images:
        order = np.argsort(present)
        return retrieval_ranks(sims[torch.from_numpy(order)], t2i)
    local = np.full(n_images, len(present), dtype=np.int64)  # absent images -> an extra row of lowest scores
    local[present] = np.arange(len(present))
    floor = torch.full((1, n_texts), torch.finfo(sims.dtype).min, dtype=sims.dtype)
    i2t_local, t2i_ranks = retrieval_ranks(torch.cat([sims, floor]), local[t2i])
    i2t = np.full(n_images, n_texts, dtype=np.int64)
    i2t[present] = i2t_local[: len(present)]
    has_caption = np.bincount(t2i, minlength=n_images) > 0
    i2t[~has_caption] = -1  # images without captions are excluded from i2t recall, as in retrieval_ranks
    t2i_ranks = np.where(local[t2i] == len(present), n_images, t2i_ranks)
    return i2t, t2i_ranks


def recall_with_missing(sims_present: Any, present: Sequence[int], text_to_image: Any, n_images: int,
                        ks: Sequence[int] = KS) -> dict[str, float]:
    return recalls_from_ranks(*ranks_with_missing(sims_present, present, text_to_image, n_images), ks)
