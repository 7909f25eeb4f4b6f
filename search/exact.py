"""Exact top-K by inner product over embeddings read block by block: every candidate scored, memory bounded.

Order: score descending, then row ascending (as `pipeline score` ranks ties), so a result list and a score rank
agree.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from data.progress import Progress

EMPTY = (np.zeros(0, np.float32), np.zeros(0, np.int64))


def rows_per_block(dim: int, queries: int, memory_gb: float) -> int:
    """Candidates per block so that the block's embeddings and its query x candidate scores fit ``memory_gb``
    (with room for the copies numpy makes)."""
    return max(1, int(memory_gb * 1e9 / (3 * 4 * (dim + queries))))


def _best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of one query's (scores, rows), ties broken by the lower row."""
    if len(scores) > k:
        keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]  # the k best and any ties with them
        scores, rows = scores[keep], rows[keep]
    order = np.lexsort((rows, -scores))[:k]
    return scores[order], rows[order]


def top_k(blocks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int, total: int = 0,
          desc: str = "exact search") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query (rows of ``queries``): the ``k`` best (scores, candidate ids) over the (ids, embeddings) blocks.

    A query gets fewer than ``k`` when there are fewer candidates. ``total``: candidates expected, for progress.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = [EMPTY] * len(queries)
    with Progress(desc, total, unit="candidate", logger="pipeline.search") as progress:
        for ids, embeds in blocks:
            scores = queries @ np.asarray(embeds, dtype=np.float32).T
            ids = np.asarray(ids, dtype=np.int64)
            for q, (s, r) in enumerate(best):
                best[q] = _best(np.concatenate([s, scores[q]]), np.concatenate([r, ids]), k)
            progress.update(len(ids))
    return [s for s, _ in best], [r for _, r in best]
