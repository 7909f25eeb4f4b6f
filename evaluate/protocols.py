"""Protocols beyond the split's own recall table: COCO 1K (five folds of 1,000 images) and ECCV Caption / CxC / PMRP.

Each row of the table hands over a ``Scores``: how its method scores any part of the split. COCO 1K scores each
fold as a test split of its own (whatever depends on the gallery, such as late fusion's standardisation or
QB-Norm's activation set, is recomputed on the fold; settings tuned on val are kept) and averages the folds'
recall. ECCV Caption and friends score each query's top-K list over the whole split (see ``eccv``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .coverage import Coverage
from .eccv import EccvMetrics
from .recall import recall_curve, recalls_from_ranks, retrieval_ranks
from .topk import top_k, top_k_from_embeddings

FOLDS, FOLD_IMAGES = 5, 1000


@dataclass(frozen=True)
class Part:
    """Which images (rows of the method's present images) and captions (split rows) to score; None: all.
    ``fold``: the COCO 1K fold this part is (None: the whole split)."""

    images: torch.Tensor | None = None
    captions: torch.Tensor | None = None
    fold: int | None = None

    @property
    def whole(self) -> bool:
        return self.images is None and self.captions is None


@dataclass
class Scores:
    """One row's scores over any part of the split: ``block(part)`` -> (scores ranking captions for each image,
    scores ranking images for each caption), both present images x captions (often the same tensor).

    present: the split's image rows the method has (ascending). embeddings: (images, texts) when the scores are
    their dot products, so that top-K lists are computed block by block instead of from the whole matrix.
    """

    present: np.ndarray
    block: Callable[[Part], tuple[torch.Tensor, torch.Tensor]]
    embeddings: tuple[Any, Any] | None = None

    @classmethod
    def of_matrices(cls, present: np.ndarray, for_i2t: torch.Tensor, for_t2i: torch.Tensor) -> "Scores":
        """Scores that do not depend on the gallery: any part is a slice of the whole split's matrices."""
        def block(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
            a = part_of(for_i2t, part)
            return (a, a) if for_t2i is for_i2t else (a, part_of(for_t2i, part))

        return cls(np.asarray(present), block)

    def computed(self) -> tuple[tuple[torch.Tensor, torch.Tensor], "Scores"]:
        """(the whole split's scores, these Scores answering the whole split with them instead of again)."""
        whole = self.block(Part())
        return whole, Scores(self.present, lambda part: whole if part.whole else self.block(part), self.embeddings)


def part_of(m: torch.Tensor, part: Part) -> torch.Tensor:
    """The rows and columns of a present images x captions matrix that ``part`` names."""
    m = m if part.images is None else m[part.images]
    return m if part.captions is None else m[:, part.captions]


def coco_1k_folds(n_images: int, text_to_image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image rows, caption rows) of each fold: consecutive runs of 1,000 images in split order, their captions."""
    if n_images != FOLDS * FOLD_IMAGES:
        raise ValueError(f"the COCO 1K protocol needs a 5,000-image split (COCO 5K test), not {n_images:,} images")
    t2i = np.asarray(text_to_image)
    return [(np.arange(f * FOLD_IMAGES, (f + 1) * FOLD_IMAGES),
             np.flatnonzero((t2i >= f * FOLD_IMAGES) & (t2i < (f + 1) * FOLD_IMAGES))) for f in range(FOLDS)]


def mean_recalls(recalls: list[dict[str, float]]) -> dict[str, float]:
    """Each key averaged over the folds (rsum: the mean of the folds' rsums, which is the sum of the means)."""
    return {key: float(np.mean([r[key] for r in recalls])) for key in recalls[0]}


def ranks_of(for_i2t: torch.Tensor, for_t2i: torch.Tensor, text_to_image: Any) -> tuple[np.ndarray, np.ndarray]:
    """(i2t ranks, t2i ranks): one counting pass when both directions rank the same scores."""
    if for_i2t is for_t2i:
        return retrieval_ranks(for_i2t, text_to_image)
    return retrieval_ranks(for_i2t, text_to_image, which="i2t")[0], \
        retrieval_ranks(for_t2i, text_to_image, which="t2i")[1]


class Protocols:
    """Collects, per row of the table, its COCO 1K row (and curves) and its ECCV Caption metrics."""

    def __init__(self, text_to_image: np.ndarray, n_images: int, coco_1k: bool = False,
                 eccv: EccvMetrics | None = None):
        self.t2i = np.asarray(text_to_image)
        self.n_images = n_images
        self.folds = coco_1k_folds(n_images, self.t2i) if coco_1k else None
        self.eccv = eccv
        self.rows_1k: list[dict] = []
        self.curves_1k: dict[str, dict[str, list[float]]] = {}
        self.notes: dict[str, Any] = {}
        if eccv is not None:
            self.notes["eccv"] = (f"eccv_caption {', '.join(eccv.targets)} from each query's top {eccv.k} "
                                  f"(fractions in the JSON, percent in the tables)")
            if eccv.left_out:
                self.notes["eccv"] += (f"; {eccv.left_out} captions of the split are not in the package's 25,000 "
                                       f"and are left out of its lists, so its coco_5k figures can differ slightly "
                                       f"from the table's")

    def add(self, row: dict, scores: Scores) -> None:
        """Score ``row["method"]`` by every protocol asked for: a COCO 1K row, and ``row["eccv"]``."""
        if self.folds is not None:
            self._coco_1k(row["method"], scores)
        if self.eccv is not None:
            if len(scores.present) < self.n_images:
                self.notes.setdefault("eccv_skipped", {})[row["method"]] = (
                    f"{self.n_images - len(scores.present)} test images are missing from its embeddings "
                    f"(excluded at extraction): the package needs every query")
            else:
                row["eccv"] = self.eccv(*self._top_lists(scores))

    def _coco_1k(self, method: str, scores: Scores) -> None:
        recalls, curves = [], []
        for f, (images, captions) in enumerate(self.folds):
            here = np.isin(scores.present, images)
            cov = Coverage(scores.present[here] - images[0], self.t2i[captions] - images[0], len(images))
            part = Part(torch.from_numpy(np.flatnonzero(here)), torch.from_numpy(captions), fold=f)
            i2t, t2i = cov.expand(*ranks_of(*scores.block(part), cov.local_t2i))
            recalls.append(recalls_from_ranks(i2t, t2i))
            curves.append((recall_curve(i2t), recall_curve(t2i)))
        self.rows_1k.append({"method": method, **mean_recalls(recalls)})
        self.curves_1k[method] = {d: np.mean([c[k] for c in curves], axis=0).tolist()
                                  for k, d in enumerate(("i2t", "t2i"))}

    def _top_lists(self, scores: Scores) -> tuple[torch.Tensor, torch.Tensor]:
        if scores.embeddings is not None:
            return top_k_from_embeddings(*scores.embeddings, self.eccv.i2t_length)
        for_i2t, for_t2i = scores.block(Part())
        i2t = top_k(for_i2t, self.eccv.i2t_length, which="i2t")[0]
        t2i = top_k(for_t2i, self.eccv.k, which="t2i")[1]
        return i2t, t2i
