"""Each query's K best candidates, in the order the recall metric ranks them, from scores or embeddings.

The order is the one of ``recall.retrieval_ranks``: score descending, then candidate index ascending. It is
exact with ties: the K-th best score of a row is found first, then every candidate at least as good is
ordered by (score, index). Scores are read in blocks of image rows (contiguous, and from embeddings computed
once for both directions); each caption keeps a running top K across the blocks.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from .recall import DIRECTIONS, _rows, _tensor


def _ordered(values: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """The first k of each row's candidates (values, indices) by score descending, then index ascending."""
    by_index = idx.argsort(dim=1)
    idx, values = idx.gather(1, by_index), values.gather(1, by_index)
    by_score = values.argsort(dim=1, descending=True, stable=True)  # stable: equal scores keep index order
    return idx.gather(1, by_score)[:, :k]


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of x (queries x candidates), the indices of its k best candidates, best first, ties by index."""
    n = x.shape[1]
    k = min(k, n)
    x = x.contiguous()  # topk along strided rows is several times slower
    if not torch.isfinite(x.sum()) and torch.isnan(x).any():  # the sum rules NaN out cheaply
        raise ValueError("similarity scores contain NaN")
    values, idx = x.topk(min(k + 1, n), dim=1)
    out = _ordered(values[:, :k], idx[:, :k], k)
    if n > k:  # rows whose k-th score recurs past place k: all the candidates that good, then the order
        tied = (values[:, k] == values[:, k - 1]).nonzero().squeeze(1)
        if tied.numel():
            rows = x[tied]
            ahead = int((rows >= values[tied, k - 1:k]).sum(1).max())
            out[tied] = _ordered(*rows.topk(ahead, dim=1), k)
    return out


def _top_of_blocks(blocks: Iterator[tuple[int, torch.Tensor]], k: int, which: str):
    """(i2t, t2i) top-k lists from consecutive blocks (first row, rows x all captions) of an images x captions
    matrix. A caption's running list holds earlier (lower-index) images, so merging by position keeps ties in
    index order."""
    if which not in DIRECTIONS:
        raise ValueError(f"which must be one of {DIRECTIONS}, not {which!r}")
    i2t, values, images = [], None, None
    for r0, block in blocks:
        if which in ("both", "i2t"):
            i2t.append(top_indices(block, k).cpu())
        if which in ("both", "t2i"):
            cols = block.T.contiguous()  # captions x this block's images (a fast copy: the block is contiguous)
            held = 0 if values is None else values.shape[1]
            if values is not None:
                cols = torch.cat([values, cols], dim=1)
            top = top_indices(cols, k)
            new = r0 + top - held  # a position past the held ones is an image of this block
            images = new if images is None else torch.where(top < held, images.gather(1, top.clamp(max=held - 1)), new)
            values = cols.gather(1, top)
    return (torch.cat(i2t) if i2t else None), (images.cpu() if images is not None else None)


BLOCK_ENTRIES = 1 << 27  # scores per block (512 MB of float32): few, large blocks; topk has a cost per row


def _block_rows(n_captions: int, block: int | None) -> int:
    return block or max(1, BLOCK_ENTRIES // max(n_captions, 1))


def top_k(sims: Any, k: int, which: str = "both", block: int | None = None
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(i2t, t2i) of an images x captions score matrix: i2t[i] the k best captions of image i, t2i[j] the k best
    images of caption j (int64 tensors; None for the direction not asked). block: image rows per step (default:
    BLOCK_ENTRIES scores); the t2i side holds a transposed copy of one block."""
    s = _tensor(sims)
    block = _block_rows(s.shape[1], block)
    return _top_of_blocks(((a, s[a:a + block]) for a in range(0, s.shape[0], block)), k, which)


def top_k_from_embeddings(image_embeds: Any, text_embeds: Any, k: int, block: int | None = None,
                          device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """top_k of image_embeds @ text_embeds.T, each block of image rows computed once for both directions
    (float32 math; results on the CPU). Memory: about 2 x block x captions x 4 bytes, plus the embeddings."""
    device = torch.device(device)
    images, texts = _rows(image_embeds, 0, None, device), _rows(text_embeds, 0, None, device)
    block = _block_rows(texts.shape[0], block)
    return _top_of_blocks(((a, images[a:a + block] @ texts.T) for a in range(0, images.shape[0], block)), k, "both")
