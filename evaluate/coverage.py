"""Recall when some images were excluded at extraction (--skip-bad): they and their captions count as misses.

Scores are computed for the present images only (rows in the order of ``present``), against every caption.
Captions of absent images have no positive among those rows (target -1): they stay candidates for every present
image (as they would be with their image present) but are nobody's positive, and their own ranks are misses.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evaluate.recall import KS, recalls_from_ranks, retrieval_ranks

MISS = np.iinfo(np.int64).max // 2  # a rank past any K


class Coverage:
    """Maps between a split's images and the present ones."""

    def __init__(self, present: Sequence[int], text_to_image: Any, n_images: int):
        self.present = np.asarray(present, dtype=np.int64)
        self.t2i = np.asarray(text_to_image, dtype=np.int64)
        self.n_images = n_images
        local = np.full(n_images, -1, dtype=np.int64)
        local[self.present] = np.arange(len(self.present))
        self.local_t2i = local[self.t2i]  # -1: the caption's image is absent
        self.absent_caption = self.local_t2i < 0

    @property
    def complete(self) -> bool:
        return len(self.present) == self.n_images

    def expand(self, i2t_local: np.ndarray, t2i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ranks in index order: absent images and their captions rank past any K."""
        i2t = np.full(self.n_images, MISS, dtype=np.int64)
        i2t[self.present] = i2t_local
        i2t[np.bincount(self.t2i, minlength=self.n_images) == 0] = -1  # no captions: excluded, as in retrieval_ranks
        return i2t, np.where(self.absent_caption, MISS, t2i)


def recall_with_missing(sims_present: Any, present: Sequence[int], text_to_image: Any, n_images: int,
                        ks: Sequence[int] = KS) -> dict[str, float]:
    """retrieval_recall of the present images' score rows, absent images and their captions counted as misses."""
    cov = Coverage(present, text_to_image, n_images)
    return recalls_from_ranks(*cov.expand(*retrieval_ranks(sims_present, cov.local_t2i)), ks)
