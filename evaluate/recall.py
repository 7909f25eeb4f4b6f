"""Recall@K for image-text retrieval: exact, tie-aware ranks counted tile by tile from a similarity matrix or from embeddings."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch

KS = (1, 5, 10)
# Counting tile (images, captions): its temporaries stay in cache; fastest on a 2-core CPU (bench/score.py).
TILE = (256, 4096)
DIRECTIONS = ("both", "i2t", "t2i")


def _tensor(x: Any) -> torch.Tensor:
    """x (numpy, torch, memmap, or a computed dask/h5py slice) as a tensor, without copying when possible."""
    if hasattr(x, "compute"):
        x = x.compute()
    if isinstance(x, torch.Tensor):
        return x
    with warnings.catch_warnings():  # read-only memmaps: we never write through the tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(np.asarray(x))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are compared in: float16/bfloat16 widen exactly to float32; float64 is kept (narrowing would create ties)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype.is_floating_point else torch.float64


def _targets(text_to_image: Any, n_images: int, n_texts: int, device: torch.device) -> torch.Tensor:
    t2i = _tensor(text_to_image).to(device=device, dtype=torch.int64).reshape(-1)
    if t2i.numel() != n_texts:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {n_texts} captions")
    if n_texts == 0:
        raise ValueError("no captions to score")
    if int(t2i.min()) < 0 or int(t2i.max()) >= n_images:
        raise ValueError(f"text_to_image must index images 0..{n_images - 1}")
    return t2i


def _above(x: torch.Tensor) -> torch.Tensor:
    """Thresholds t with (s >= t) == (s > x) for every s: the next float up, NaN above +inf (nothing is >= NaN)."""
    up = torch.nextafter(x, torch.full_like(x, math.inf))
    return torch.where(x == math.inf, torch.full_like(x, math.nan), up)


@contextlib.contextmanager
def _exact_denormals() -> Iterator[None]:
    """The strict thresholds above 0 are denormals; CPU flush-to-zero would make them equal to 0, so switch it off."""
    flushing = bool(torch.tensor([1e-45]).ne(0).logical_not().item())
    if flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(True)


class _Counter:
    """Counts, per query, the candidates ranked ahead of its positive (score descending, then index ascending).

    Caption j's positive is image p_j with score pos_j; image i's positive is its best caption b_i (highest
    score, lowest index among equals) with score v_i. A candidate is ahead when its score is greater, or equal
    with a lower index. Per tile that is one comparison per element and direction: `s >= pos` where every
    candidate of the tile has a lower index than the positive, `s >= next float above pos` where every one has
    a higher index, and an explicit mask only for the few queries whose positive lies inside the tile.
    """

    def __init__(self, pos: torch.Tensor, t2i: torch.Tensor, n_images: int, which: str) -> None:
        if which not in DIRECTIONS:
            raise ValueError(f"which must be one of {DIRECTIONS}, not {which!r}")
        if torch.isnan(pos).any():
            raise ValueError("similarity scores contain NaN")
        n_texts, dev = pos.numel(), pos.device
        self.t2i, self.pos, self.pos_above = t2i, pos, _above(pos)
        best = torch.full((n_images,), -math.inf, dtype=pos.dtype, device=dev)
        best.scatter_reduce_(0, t2i, pos, "amax")
        at_best = pos == best[t2i]
        col = torch.full((n_images,), n_texts, dtype=torch.int64, device=dev)
        col.scatter_reduce_(0, t2i[at_best], torch.arange(n_texts, device=dev)[at_best], "amin")
        self.has_caption = torch.bincount(t2i, minlength=n_images) > 0
        self.best, self.best_col, self.best_above = best, col, _above(best)
        self.do_i2t, self.do_t2i = which in ("both", "i2t"), which in ("both", "t2i")
        self.n_i2t = torch.zeros(n_images, dtype=torch.int32, device=dev) if self.do_i2t else None
        self.n_t2i = torch.zeros(n_texts, dtype=torch.int32, device=dev) if self.do_t2i else None

    def add(self, block: torch.Tensor, r0: int, c0: int, tile: Sequence[int], dtype: torch.dtype) -> None:
        """Count the scores of block = sims[r0:r0+h, c0:c0+w], tile by tile."""
        th, tw = tile
        for a in range(0, block.shape[0], th):
            for b in range(0, block.shape[1], tw):
                x = block[a:a + th, b:b + tw].to(dtype)
                if not torch.isfinite(x.sum()) and torch.isnan(x).any():  # the cheap sum rules NaN out nearly always
                    raise ValueError("similarity scores contain NaN")
                self._tile(x, r0 + a, c0 + b)

    def _tile(self, x: torch.Tensor, r0: int, c0: int) -> None:
        r1, c1 = r0 + x.shape[0], c0 + x.shape[1]
        if self.do_i2t:
            col, v = self.best_col[r0:r1], self.best[r0:r1]
            n = (x >= torch.where(col >= c1, v, self.best_above[r0:r1])[:, None]).sum(1, dtype=torch.int32)
            mixed = ((col >= c0) & (col < c1)).nonzero().squeeze(1)
            if mixed.numel():  # rows whose best caption is in this tile: add the equal scores left of it
                self._same(x[mixed, col[mixed] - c0], v[mixed])
                lower = torch.arange(c0, c1, device=x.device) < col[mixed, None]
                n[mixed] += ((x[mixed] == v[mixed, None]) & lower).sum(1, dtype=torch.int32)
            self.n_i2t[r0:r1] += n
        if self.do_t2i:
            row, s = self.t2i[c0:c1], self.pos[c0:c1]
            n = (x >= torch.where(row >= r1, s, self.pos_above[c0:c1])).sum(0, dtype=torch.int32)
            mixed = ((row >= r0) & (row < r1)).nonzero().squeeze(1)
            if mixed.numel():  # captions whose image is in this tile: add the equal scores above it
                self._same(x[row[mixed] - r0, mixed], s[mixed])
                lower = torch.arange(r0, r1, device=x.device)[:, None] < row[mixed]
                n[mixed] += ((x[:, mixed] == s[mixed]) & lower).sum(0, dtype=torch.int32)
            self.n_t2i[c0:c1] += n

    @staticmethod
    def _same(seen: torch.Tensor, expected: torch.Tensor) -> None:
        """The positive scores met while counting must be the thresholds' own values, bit for bit."""
        if not torch.equal(seen, expected):
            raise RuntimeError("a positive's score changed between passes: the block products are not reproducible")

    def ranks(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        i2t = t2i = None
        if self.do_i2t:
            i2t = torch.where(self.has_caption, self.n_i2t.long(), -1).cpu().numpy()
        if self.do_t2i:
            t2i = self.n_t2i.long().cpu().numpy()
        return i2t, t2i


def retrieval_ranks(sims: Any, text_to_image: Any, chunk_size: Sequence[int] | int = TILE,
                    which: str = "both") -> tuple[np.ndarray | None, np.ndarray | None]:
    """0-based rank of the positive for every query: (i2t ranks per image, t2i ranks per caption).

    sims: images x captions scores (numpy array, memmap or torch tensor, any float dtype, any device);
    text_to_image[j]: image index of caption j. Candidates rank by score descending, then index ascending
    (an equal score with a lower index ranks ahead). An image's i2t rank is that of its best caption; an image
    without captions gets -1 (excluded from i2t recall). chunk_size: (images, captions) per tile, bounding
    temporary memory to about 6 bytes per tile entry. which: "both", "i2t" or "t2i" (the other is None).
    Raises ValueError on NaN scores.
    """
    s = _tensor(sims)
    if s.ndim != 2:
        raise ValueError(f"sims must be 2-D, got shape {tuple(s.shape)}")
    tile = (chunk_size, chunk_size) if isinstance(chunk_size, int) else tuple(chunk_size)
    n_images, n_texts = s.shape
    t2i = _targets(text_to_image, n_images, n_texts, s.device)
    dtype = _compute_dtype(s.dtype)
    with _exact_denormals():
        counter = _Counter(s[t2i, torch.arange(n_texts, device=s.device)].to(dtype), t2i, n_images, which)
        counter.add(s, 0, 0, tile, dtype)
    return counter.ranks()


def _rows(x: Any, a: int, b: int, device: torch.device) -> torch.Tensor:
    """Rows a:b of an embedding matrix (numpy, torch, h5py or dask) as a fresh float32 tensor.

    Always a new allocation, so that a block's matmul sees the same memory alignment on every pass
    (some BLAS pick kernels by alignment, which could change the last bit of a dot product).
    """
    src = _tensor(x[a:b])
    out = torch.empty(src.shape, dtype=torch.float32, device=device)
    return out.copy_(src)


def retrieval_ranks_from_embeddings(image_embeds: Any, text_embeds: Any, text_to_image: Any,
                                    block_images: int = 4096, block_texts: int = 8192, which: str = "both",
                                    tile: Sequence[int] = TILE, device: str | torch.device | None = None,
                                    ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """retrieval_ranks of image_embeds @ text_embeds.T without holding that matrix (float32 math).

    Embeddings: numpy arrays, memmaps, torch tensors, h5py datasets or dask arrays, read block_images /
    block_texts rows at a time. Pass 1 computes only the blocks holding positives and takes each caption's
    positive score from them; pass 2 recomputes every block identically and counts. Memory: about
    block_images x block_texts x 4 bytes plus the two blocks of embeddings.
    """
    n_images, n_texts = int(image_embeds.shape[0]), int(text_embeds.shape[0])
    if device is None:
        device = image_embeds.device if isinstance(image_embeds, torch.Tensor) else "cpu"
    device = torch.device(device)
    t2i = _targets(text_to_image, n_images, n_texts, device)

    def blocks(only_positive: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
        # Texts outside: each text block is read once per pass; the smaller image side is re-read.
        for c0 in range(0, n_texts, block_texts):
            txt = _rows(text_embeds, c0, c0 + block_texts, device)
            r0s = range(0, n_images, block_images)
            if only_positive:
                r0s = (torch.unique(t2i[c0:c0 + block_texts] // block_images) * block_images).tolist()
            for r0 in r0s:
                yield r0, c0, _rows(image_embeds, r0, r0 + block_images, device) @ txt.T

    pos = torch.full((n_texts,), math.nan, dtype=torch.float32, device=device)
    for r0, c0, sim in blocks(only_positive=True):
        row = t2i[c0:c0 + sim.shape[1]] - r0
        cols = ((row >= 0) & (row < sim.shape[0])).nonzero().squeeze(1)
        pos[c0 + cols] = sim[row[cols], cols]
    with _exact_denormals():
        counter = _Counter(pos, t2i, n_images, which)
        for r0, c0, sim in blocks(only_positive=False):
            counter.add(sim, r0, c0, tile, torch.float32)
    return counter.ranks()


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries (ranks >= 0) whose positive is in the top k."""
    valid = np.asarray(ranks)
    valid = valid[valid >= 0]
    return float(100.0 * np.count_nonzero(valid < k) / valid.size) if valid.size else math.nan


def recall_curve(ranks: np.ndarray, max_k: int = 50) -> np.ndarray:
    """Recall@K in percent for K = 1..max_k from one set of ranks."""
    valid = np.asarray(ranks)
    valid = valid[valid >= 0]
    hits = np.cumsum(np.bincount(np.minimum(valid, max_k), minlength=max_k + 1)[:max_k])
    return 100.0 * hits / max(valid.size, 1)


def recalls_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """{i2t_r{k}, t2i_r{k} for k in ks, rsum} in percent."""
    out = {f"i2t_r{k}": recall_at_k(i2t_ranks, k) for k in ks}
    out.update({f"t2i_r{k}": recall_at_k(t2i_ranks, k) for k in ks})
    out["rsum"] = float(sum(out.values()))
    return out


def retrieval_recall(sims: Any, text_to_image: Any, ks: Sequence[int] = KS,
                     chunk_size: Sequence[int] | int = TILE) -> dict[str, float]:
    """Image->text and text->image recall@K (percent) and rsum from an images x captions score matrix.

    i2t R@K: share of images (with at least one caption) with a caption in their top K captions;
    t2i R@K: share of captions whose image is in their top K images. Ties: see retrieval_ranks.
    """
    return recalls_from_ranks(*retrieval_ranks(sims, text_to_image, chunk_size), ks)


def retrieval_recall_from_embeddings(image_embeds: Any, text_embeds: Any, text_to_image: Any,
                                     ks: Sequence[int] = KS, block_images: int = 4096, block_texts: int = 8192,
                                     device: str | torch.device | None = None) -> dict[str, float]:
    """retrieval_recall of image_embeds @ text_embeds.T (pass normalised embeddings), computed block by block."""
    ranks = retrieval_ranks_from_embeddings(image_embeds, text_embeds, text_to_image, block_images, block_texts,
                                            device=device)
    return recalls_from_ranks(*ranks, ks)
