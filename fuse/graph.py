"""HADA's per-sample graphs for a whole batch, as edges into the global nodes (the only nodes read out).

A sample's nodes are each backbone's rows (row 0 = the backbone's global node ``c_b``, the rest its token
nodes ``f_b``), in backbone order, as HADA-LAVIS concatenates them. Its edges (weight = 1-d edge feature):

* token ``f_b`` -> its own global ``c_b``: ``token_own`` (``wfc``, 0.9)
* token ``f_b`` -> every other global ``c_b'``: ``token_other`` (``wfcx``, 0.7)
* global ``c_b`` <-> global ``c_b'``: ``global_global`` (``wcc``, 1.1)
* a self-loop on every node. The reference lists self-loops of weight 1, but its ``GATv2Conv`` keeps PyG's
  ``add_self_loops=True, fill_value='mean'``: PyG drops the listed loops and adds its own whose weight is the
  mean of the node's other incoming edge weights (BLIP CLS with 576 tokens and one CLIP node:
  (576 x 0.9 + 1.1) / 577 = 0.9003; the CLIP node: (576 x 0.7 + 1.1) / 577 = 0.7007; a token node: 0).
  ``EdgeWeights.self_loop`` set to a number gives explicit loops of that weight instead (a deviation).

Every global node thus receives one edge from every node of its sample, itself included, and with a single
attention layer only the global nodes' outputs are used, so only edges into global nodes are built (a
token's own output never reaches the read-out). Two layouts of the same edges:

* ``bipartite_graph``: PyG edge lists. Sources are all rows in backbone-major order (all of backbone 0's rows
  of the batch as stacked in its ``NodeBlock``, then backbone 1's, ...); targets are the N*B global nodes in
  sample-major order (target ``i * B + b`` is ``c_b`` of sample i).
* ``dense_graph``: each sample's nodes placed in ``S`` slots in the per-sample order above, with an
  (N, B, S) edge-weight table: every node of a sample feeds every global node of it, so attention is dense.
  It maps slots to the stacked rows and back (``fuse.attention.Sources``): the rows stay where they are.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from fuse.config import EdgeWeights


def _check(counts: Sequence[Tensor]) -> int:
    if len(counts) == 0:
        raise ValueError("need at least one backbone")
    n = counts[0].numel()
    if any(c.numel() != n for c in counts):
        raise ValueError("every backbone needs a row count for every sample")
    return n


def self_loop_weights(counts: Sequence[Tensor], weights: EdgeWeights) -> Tensor:
    """(N, B) float32: the self-loop weight of each sample's global node of each backbone.

    PyG's ``fill_value='mean'``: the mean weight of the node's other incoming edges (0 when there are none).
    """
    c = torch.stack([x.to(torch.float32) for x in counts], dim=1)  # (N, B) rows per backbone
    if weights.self_loop is not None:
        return torch.full_like(c, float(weights.self_loop))
    tokens = c - 1
    own = tokens * weights.token_own
    other = (tokens.sum(dim=1, keepdim=True) - tokens) * weights.token_other
    globals_ = (c.size(1) - 1) * weights.global_global
    incoming = c.sum(dim=1, keepdim=True) - 1
    return torch.where(incoming > 0, (own + other + globals_) / incoming.clamp_min(1), torch.zeros_like(c))


def _edge_weight(src_backbone: int | Tensor, src_global: Tensor, target: int | Tensor, self_loop: Tensor,
                 weights: EdgeWeights) -> Tensor:
    """Weight of an edge from a node (its backbone, whether it is a global node) into global ``c_target``."""
    same = torch.as_tensor(src_backbone == target, device=self_loop.device)
    glob = torch.where(same, self_loop, torch.full_like(self_loop, weights.global_global))
    tok = torch.where(same, torch.full_like(self_loop, weights.token_own),
                      torch.full_like(self_loop, weights.token_other))
    return torch.where(src_global, glob, tok)


class RowInfo(NamedTuple):
    sample: Tensor  # (rows,) sample of each row
    local: Tensor  # (rows,) row number within its sample (0 = global node)


def _rows(counts: Tensor, num_rows: int) -> RowInfo:
    counts = counts.to(torch.long)
    start = counts.cumsum(0) - counts
    sample = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                     output_size=num_rows)
    return RowInfo(sample, torch.arange(num_rows, device=counts.device) - start[sample])


def bipartite_graph(counts: Sequence[Tensor], weights: EdgeWeights, num_rows: Sequence[int]
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Edges into the global nodes, for ``GATv2Conv((x, x[global_index.view(-1)]), edge_index, edge_attr)``
    with ``add_self_loops=False`` (self-loops are listed, with their weights).

    Args:
        counts: per backbone, the (N,) row counts (>= 1, global row included) of the batch's samples.
        weights: the edge weights.
        num_rows: per backbone ``counts.sum()`` (known on the host: saves a device sync).

    Returns:
        ``edge_index`` (2, E), ``edge_attr`` (E, 1) float32, ``global_index`` (N, B): the source node (in
        backbone-major order) of each sample's global node of each backbone.
    """
    _check(counts)
    num_b = len(counts)
    loops = self_loop_weights(counts, weights)
    src, dst, wt, starts = [], [], [], []
    base = 0
    for b, c in enumerate(counts):
        rows = _rows(c, int(num_rows[b]))
        nodes = base + torch.arange(int(num_rows[b]), device=c.device)
        starts.append(base + c.to(torch.long).cumsum(0) - c.to(torch.long))
        for t in range(num_b):
            src.append(nodes)
            dst.append(rows.sample * num_b + t)
            wt.append(_edge_weight(b, rows.local == 0, t, loops[rows.sample, t], weights))
        base += int(num_rows[b])
    edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
    return edge_index, torch.cat(wt).unsqueeze(1), torch.stack(starts, dim=1)


class DenseGraph(NamedTuple):
    """A batch's samples in ``S`` node slots each (per-sample order: backbone 0's rows, then 1's, ...).

    Rows are numbered as stacked: all of backbone 0's rows (its ``NodeBlock`` order), then backbone 1's, ...
    """

    slots: Sequence[Tensor]  # per backbone, (rows,): flat slot ``sample * S + position`` of each stacked row
    mask: Tensor  # (N, S) bool: the slot holds a node
    edge_attr: Tensor  # (N, B, S) float32: weight of the edge from slot s into global node b
    global_slot: Tensor  # (N, B): position of each global node within its sample
    row: Tensor  # (N, S) int64: the stacked row in each slot (0 in empty slots)


def dense_graph(counts: Sequence[Tensor], weights: EdgeWeights, num_rows: Sequence[int], slots: int) -> DenseGraph:
    """The same edges as ``bipartite_graph``, laid out densely; ``slots`` >= the largest sample's node count."""
    n = _check(counts)
    device = counts[0].device
    num_b = len(counts)
    loops = self_loop_weights(counts, weights)
    offset = torch.zeros(n, dtype=torch.long, device=device)  # where backbone b's rows start in each sample
    flat, backbone, is_global = [], torch.full((n * slots,), -1, device=device), torch.zeros(
        n * slots, dtype=torch.bool, device=device)
    global_slot = []
    for b, c in enumerate(counts):
        rows = _rows(c, int(num_rows[b]))
        slot = rows.sample * slots + offset[rows.sample] + rows.local
        flat.append(slot)
        backbone[slot] = b
        is_global[slot] = rows.local == 0
        global_slot.append(offset.clone())
        offset = offset + c.to(torch.long)
    backbone, is_global = backbone.view(n, 1, slots), is_global.view(n, 1, slots)
    targets = torch.arange(num_b, device=device).view(1, num_b, 1)
    attr = _edge_weight(backbone, is_global, targets, loops.unsqueeze(2).expand(n, num_b, slots), weights)
    mask = backbone[:, 0] >= 0
    all_slots = torch.cat(flat)
    row = torch.zeros(n * slots, dtype=torch.long, device=device)
    row[all_slots] = torch.arange(all_slots.numel(), device=device)
    return DenseGraph(flat, mask, torch.where(mask.unsqueeze(1), attr, torch.zeros_like(attr)),
                      torch.stack(global_slot, dim=1), row.view(n, slots))
