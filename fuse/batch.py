"""Packed per-backbone features of a split held in memory, and batches gathered from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class NodeBlock:
    """One backbone's nodes for a batch of samples (one side).

    ``tokens`` stacks the samples' rows in batch order; row 0 of every sample is
    the backbone's global node, the rest its token nodes. ``counts[i] >= 1`` is
    sample i's row count; ``embeds`` holds the raw (unnormalised) retrieval
    projection, one row per sample.
    """

    tokens: Tensor  # (sum(counts), W)
    counts: Tensor  # (batch,) int64
    embeds: Tensor  # (batch, D)
    host_counts: Optional[Tensor] = None  # ``counts`` on the host, when known (spares a device sync)

    @property
    def batch_size(self) -> int:
        return self.counts.numel()

    @property
    def width(self) -> int:
        return self.tokens.size(1)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "NodeBlock":
        """Move to ``device``; ``dtype`` casts ``tokens`` and ``embeds`` (not ``counts``)."""
        return NodeBlock(self.tokens.to(device=device, dtype=dtype), self.counts.to(device=device),
                         self.embeds.to(device=device, dtype=dtype), self.host_counts)

    def counts_on_host(self) -> Tensor:
        return self.host_counts if self.host_counts is not None else self.counts.cpu()


@dataclass
class PackedFeatures:
    """One backbone and one side of a whole split: all samples' rows stacked.

    Sample i owns ``tokens[offsets[i]:offsets[i + 1]]`` (row 0 = global node) and
    ``embeds[i]``. Tokens may be stored as float16 to halve memory; ``gather``
    casts on the target device.
    """

    tokens: Tensor  # (total_rows, W) float16/float32
    offsets: Tensor  # (N + 1,) int64
    embeds: Tensor  # (N, D) float32

    def __post_init__(self) -> None:
        self.offsets = self.offsets.to(torch.long)
        if self.tokens.dim() != 2 or self.embeds.dim() != 2 or self.offsets.dim() != 1:
            raise ValueError("tokens and embeds must be 2-d, offsets 1-d")
        if self.offsets.numel() != self.embeds.size(0) + 1:
            raise ValueError(f"offsets has {self.offsets.numel()} entries for "
                             f"{self.embeds.size(0)} samples (expected N + 1)")
        # A one-off check (a sync on GPU), worth it: every later step relies on it.
        off = self.offsets.cpu()
        if off[0] != 0 or off[-1] != self.tokens.size(0):
            raise ValueError("offsets must start at 0 and end at tokens.size(0)")
        if off.numel() > 1 and bool((off[1:] - off[:-1] < 1).any()):
            raise ValueError("every sample needs at least one row (its global node)")
        self.host_counts = off[1:] - off[:-1]  # rows per sample, on the host: batch sizes without a device sync

    @classmethod
    def from_samples(cls, tokens: Sequence[Tensor], embeds: Tensor) -> "PackedFeatures":
        """Pack a list of per-sample (n_i, W) token matrices."""
        counts = torch.tensor([t.size(0) for t in tokens], dtype=torch.long)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(torch.cat(list(tokens)), offsets, embeds)

    def __len__(self) -> int:
        return self.embeds.size(0)

    @property
    def width(self) -> int:
        return self.tokens.size(1)

    @property
    def embed_dim(self) -> int:
        return self.embeds.size(1)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device) -> "PackedFeatures":
        """A copy on ``device`` (e.g. the whole split in GPU memory when it fits)."""
        return PackedFeatures(self.tokens.to(device), self.offsets.to(device),
                              self.embeds.to(device))

    def gather(self, idx: Tensor, device=None,
               dtype: torch.dtype = torch.float32) -> NodeBlock:
        """The batch of samples ``idx`` (in that order) as a NodeBlock on ``device``.

        No host synchronisation: the batch's row count comes from the host copy of the counts, and the row
        indices are built where the features live.
        """
        device = self.device if device is None else torch.device(device)
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        host_counts = self.host_counts[idx.cpu()]
        total = int(host_counts.sum())
        idx = idx.to(self.device, non_blocking=True)
        starts = self.offsets[idx]
        counts = self.offsets[idx + 1] - starts
        # Row r of the batch, belonging to batch sample k, is storage row
        # starts[k] + (r - first batch row of k).
        shift = starts - (counts.cumsum(0) - counts)
        rows = torch.arange(total, device=self.device) + torch.repeat_interleave(
            shift, counts, output_size=total)
        tokens = self.tokens.index_select(0, rows)
        # Move first, cast after: float16 storage halves the host-to-device copy.
        tokens = tokens.to(device, non_blocking=True).to(dtype)
        embeds = self.embeds.index_select(0, idx).to(device, non_blocking=True).to(dtype)
        return NodeBlock(tokens, counts.to(device), embeds, host_counts)


def gather_batch(features: Sequence[PackedFeatures], idx: Tensor, device=None,
                 dtype: torch.dtype = torch.float32) -> list[NodeBlock]:
    """One side's batch: a NodeBlock per backbone, in the backbones' fixed order."""
    return [f.gather(idx, device, dtype) for f in features]
