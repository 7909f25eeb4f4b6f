"""Recall@K for image-text retrieval: exact, tie-aware ranks counted tile by tile, from scores or embeddings."""
from __future__ import annotations

import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from data.device import one_torch_thread

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
    """The dtype scores are compared in: float16/bfloat16 widen exactly to float32; float64 stays (narrowing ties)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype.is_floating_point else torch.float64


def _targets(text_to_image: Any, n_images: int, n_texts: int, device: torch.device) -> torch.Tensor:
    t2i = _tensor(text_to_image).to(device=device, dtype=torch.int64).reshape(-1)
    if t2i.numel() != n_texts:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {n_texts} captions")
    if n_texts == 0:
        raise ValueError("no captions to score")
    if int(t2i.min()) < -1 or int(t2i.max()) >= n_images:
        raise ValueError(f"text_to_image must index images 0..{n_images - 1} (or be -1: no positive image)")
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

    On CPU the tiles' row bands are shared among torch.get_num_threads() Python threads, each running torch
    single-threaded: a tile's ops are too small for intra-op threads, whose barriers stall whenever another
    process holds a core (10x slower on a busy 2-core machine). Use it as a context manager (the thread pool).
    """

    def __init__(self, pos: torch.Tensor, t2i: torch.Tensor, n_images: int, which: str) -> None:
        if which not in DIRECTIONS:
            raise ValueError(f"which must be one of {DIRECTIONS}, not {which!r}")
        if torch.isnan(pos).any():
            raise ValueError("similarity scores contain NaN")
        n_texts, dev = pos.numel(), pos.device
        # A caption without a positive (target -1) is a candidate like any other but never a query's positive:
        # its positive score is +inf, whose strict threshold (NaN) counts nothing, and its rank is -1.
        self.has_target = t2i >= 0
        pos = torch.where(self.has_target, pos, torch.full_like(pos, math.inf))
        self.t2i, self.pos, self.pos_above = t2i, pos, _above(pos)
        cols = torch.arange(n_texts, device=dev)[self.has_target]
        targets, scores = t2i[self.has_target], pos[self.has_target]
        best = torch.full((n_images,), -math.inf, dtype=pos.dtype, device=dev)
        best.scatter_reduce_(0, targets, scores, "amax")
        at_best = scores == best[targets]
        col = torch.full((n_images,), n_texts, dtype=torch.int64, device=dev)
        col.scatter_reduce_(0, targets[at_best], cols[at_best], "amin")
        self.has_caption = torch.bincount(targets, minlength=n_images) > 0
        self.best, self.best_col, self.best_above = best, col, _above(best)
        self.do_i2t, self.do_t2i = which in ("both", "i2t"), which in ("both", "t2i")
        self.workers = torch.get_num_threads() if dev.type == "cpu" else 1
        # i2t counts: row bands are disjoint between workers; t2i counts: one array per worker, summed at the end.
        self.n_i2t = torch.zeros(n_images, dtype=torch.int32, device=dev) if self.do_i2t else None
        self.n_t2i = [torch.zeros(n_texts, dtype=torch.int32, device=dev) if self.do_t2i else None
                      for _ in range(self.workers)]
        self._bufs: list[torch.Tensor | None] = [None] * self.workers
        self._pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __enter__(self) -> "_Counter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def add(self, block: torch.Tensor, r0: int, c0: int, tile: Sequence[int], dtype: torch.dtype) -> None:
        """Count the scores of block = sims[r0:r0+h, c0:c0+w], tile by tile."""
        th, tw = (min(n, 1 << 24) for n in tile)  # float32 sums of 0/1 stay exact up to 2**24
        bands = list(range(0, block.shape[0], th))

        def run(w: int) -> None:
            with _exact_denormals():  # per thread: the FPU mode is thread-local
                for a in bands[w::self.workers]:
                    for b in range(0, block.shape[1], tw):
                        x = block[a:a + th, b:b + tw].to(dtype)
                        if not torch.isfinite(x.sum()) and torch.isnan(x).any():  # the sum rules NaN out cheaply
                            raise ValueError("similarity scores contain NaN")
                        self._tile(x, r0 + a, c0 + b, w)

        if self._pool is None:
            run(0)
        else:
            with one_torch_thread():
                list(self._pool.map(run, range(self.workers)))

    def _tile(self, x: torch.Tensor, r0: int, c0: int, w: int) -> None:
        if self.do_i2t:  # queries are the tile's rows (images), candidates its columns
            self._direction(x, r0, c0, self.best_col, self.best, self.best_above, self.n_i2t, w)
        if self.do_t2i:  # the transposed view: queries are captions, candidates images
            self._direction(x.T, c0, r0, self.t2i, self.pos, self.pos_above, self.n_t2i[w], w)

    def _direction(self, xq: torch.Tensor, q0: int, k0: int, target: torch.Tensor, score: torch.Tensor,
                   above: torch.Tensor, counts: torch.Tensor, w: int) -> None:
        """Add to counts[q0:q1] the candidates k0:k1 of tile xq (queries x candidates) ranked ahead of the positives."""
        q1, k1 = q0 + xq.shape[0], k0 + xq.shape[1]
        t, v = target[q0:q1], score[q0:q1]
        n = self._count(torch.ge, xq, torch.where(t >= k1, v, above[q0:q1]), w)
        inside = ((t >= k0) & (t < k1)).nonzero().squeeze(1)
        if inside.numel():  # queries whose positive is in this tile: counted strictly, add equal scores before it
            lo, hi = int(inside[0]), int(inside[-1]) + 1
            xs = xq[lo:hi] if hi - lo == inside.numel() else xq[inside]  # a view when contiguous (sorted captions)
            ts, vs = t[inside], v[inside]
            self._same(xs.gather(1, (ts - k0)[:, None]).squeeze(1), vs)
            tied = (self._count(torch.eq, xs, vs, w) > 1).nonzero().squeeze(1)  # rare: ties besides the positive
            if tied.numel():
                before = torch.arange(k0, k1, device=xq.device) < ts[tied, None]
                n[inside[tied]] += ((xs[tied] == vs[tied, None]) & before).sum(1, dtype=torch.int32)
        counts[q0:q1] += n

    def _count(self, op, xq: torch.Tensor, thr: torch.Tensor, w: int) -> torch.Tensor:
        """Per query (row of xq), how many op(xq, thr) hold.

        Comparing into a reused float32 buffer laid out like xq and summing it is ~3x faster on CPU than summing
        a fresh bool tensor (which torch first casts); the sums stay exact (a tile is far below 2**24).
        """
        if self._bufs[w] is None or self._bufs[w].numel() < xq.numel():
            self._bufs[w] = torch.empty(xq.numel(), dtype=torch.float32, device=xq.device)
        buf = self._bufs[w][:xq.numel()]
        out = buf.view(xq.T.shape).T if xq.stride(0) < xq.stride(1) else buf.view(xq.shape)
        return op(xq, thr[:, None], out=out).sum(1).to(torch.int32)

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
            t2i = torch.where(self.has_target, sum(n.long() for n in self.n_t2i), -1).cpu().numpy()
        return i2t, t2i


def retrieval_ranks(sims: Any, text_to_image: Any, chunk_size: Sequence[int] | int = TILE,
                    which: str = "both") -> tuple[np.ndarray | None, np.ndarray | None]:
    """0-based rank of the positive for every query: (i2t ranks per image, t2i ranks per caption).

    sims: images x captions scores (numpy array, memmap or torch tensor, any float dtype, any device);
    text_to_image[j]: image index of caption j, or -1 for a caption whose image is not among the rows (it is
    still a candidate for every image, but no query's positive; its own t2i rank is -1, excluded from t2i recall:
    evaluate.coverage counts such captions as misses). Candidates rank by score descending, then index ascending
    (an equal score with a lower index ranks ahead). An image's i2t rank is that of its best caption; an image
    without captions gets -1 (excluded from i2t recall). chunk_size: (images, captions) per tile, bounding
    temporary memory to about 4 bytes per tile entry and CPU thread. which: "both", "i2t" or "t2i" (the other
    is then None). Raises ValueError on NaN scores. On CPU, torch runs single-threaded for the duration (our
    own threads share the tiles), which also affects torch calls from other threads meanwhile.
    """
    s = _tensor(sims)
    if s.ndim != 2:
        raise ValueError(f"sims must be 2-D, got shape {tuple(s.shape)}")
    tile = (chunk_size, chunk_size) if isinstance(chunk_size, int) else tuple(chunk_size)
    n_images, n_texts = s.shape
    t2i = _targets(text_to_image, n_images, n_texts, s.device)
    dtype = _compute_dtype(s.dtype)
    pos = s[t2i.clamp_min(0), torch.arange(n_texts, device=s.device)].to(dtype)  # -1 targets: set aside by _Counter
    with _exact_denormals(), _Counter(pos, t2i, n_images, which) as counter:
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
                targets = t2i[c0:c0 + block_texts]
                r0s = (torch.unique(targets[targets >= 0] // block_images) * block_images).tolist()
            for r0 in r0s:
                yield r0, c0, _rows(image_embeds, r0, r0 + block_images, device) @ txt.T

    pos = torch.full((n_texts,), math.nan, dtype=torch.float32, device=device)
    for r0, c0, sim in blocks(only_positive=True):
        row = t2i[c0:c0 + sim.shape[1]] - r0
        cols = ((row >= 0) & (row < sim.shape[0])).nonzero().squeeze(1)
        pos[c0 + cols] = sim[row[cols], cols]
    pos[t2i < 0] = math.inf  # no positive: set aside by _Counter
    with _exact_denormals(), _Counter(pos, t2i, n_images, which) as counter:
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
