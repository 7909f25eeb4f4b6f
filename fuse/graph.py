"""HADA's per-sample graphs built for a whole batch as PyG edge lists (full and global-only).

Node order (the full graph): backbone-major, i.e. all rows of backbone 0 for
samples 0..N-1 exactly as stacked in its ``NodeBlock.tokens``, then all rows of
backbone 1, and so on. So the node feature matrix is simply
``torch.cat([proj_b(block_b.tokens) for b])``. ``NodeLayout.global_index[i, b]``
is the node holding the global node ``c_b`` of sample i.

Edges of one sample (weight = 1-d edge feature):

* token ``f_b`` -> its own global ``c_b``: ``token_own`` (0.9)
* token ``f_b`` -> every other global ``c_b'``: ``token_other`` (0.7)
* global ``c_b`` -> global ``c_b'`` for b != b' (both directions): ``global_global`` (1.1)
* a self-loop on every node: ``self_loop`` (1.0)

``undirected=True`` adds ``c_b -> f_b`` and ``c_b' -> f_b`` with the same weights;
global-global edges already go both ways and a self-loop is its own reverse,
so nothing is duplicated.

Every global node thus receives exactly one edge from every node of its sample.
The global-only graph keeps just those edges, as a bipartite graph whose targets
are the N*B global nodes in sample-major order (target ``i * B + b``), so that
``x_dst = x[layout.global_index.reshape(-1)]`` and the readout is a reshape. For
a single attention layer its outputs equal the full graph's at the global nodes,
directed or undirected: the reverse edges only feed token nodes, which are never
read out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class EdgeWeights:
    """HADA's edge weights (``wfc``, ``wfcx``, ``wcc``, ``wfsl``/``wcsl``)."""

    token_own: float = 0.9
    token_other: float = 0.7
    global_global: float = 1.1
    self_loop: float = 1.0


class NodeLayout(NamedTuple):
    """Where a batch's nodes sit in the (backbone-major) node order."""

    num_nodes: int
    global_index: Tensor  # (N, B): node of c_b of sample i
    backbone_ptr: list[int]  # backbone b owns nodes backbone_ptr[b]:backbone_ptr[b+1]
    batch: Tensor  # (num_nodes,): sample of every node


class _Rows(NamedTuple):
    nodes: Tensor  # node ids of the backbone's rows
    sample: Tensor  # sample of every row
    is_global: Tensor  # row 0 of its sample


def _rows(counts: Sequence[Tensor], num_rows: Optional[Sequence[int]]):
    """Per-backbone row bookkeeping and the layout; no per-sample Python loop."""
    if len(counts) == 0:
        raise ValueError("need at least one backbone")
    n = counts[0].numel()
    device = counts[0].device
    if any(c.numel() != n for c in counts):
        raise ValueError("every backbone needs a row count for every sample")
    if num_rows is None:
        num_rows = [int(c.sum()) for c in counts]  # a sync; callers pass it to avoid one
    ptr = [0]
    for r in num_rows:
        ptr.append(ptr[-1] + int(r))
    sample_ids = torch.arange(n, device=device)
    rows, starts = [], []
    for b, c in enumerate(counts):
        c = c.to(torch.long)
        start = c.cumsum(0) - c  # first row of each sample within backbone b
        sample = torch.repeat_interleave(sample_ids, c, output_size=int(num_rows[b]))
        local = torch.arange(int(num_rows[b]), device=device) - start[sample]
        rows.append(_Rows(torch.arange(ptr[b], ptr[b + 1], device=device), sample, local == 0))
        starts.append(start + ptr[b])
    layout = NodeLayout(ptr[-1], torch.stack(starts, dim=1), ptr,
                        torch.cat([r.sample for r in rows]))
    return rows, layout


def _into_globals(rows: list[_Rows], layout: NodeLayout, w: EdgeWeights,
                  bipartite: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every edge ending in a global node: (src, dst, weight, src is a token);
    dst is a node id or, when ``bipartite``, a target index ``i * B + b``."""
    num_b = len(rows)
    src, dst, wt, tok = [], [], [], []
    for s, r in enumerate(rows):
        for t in range(num_b):
            if s == t:
                weight = torch.where(r.is_global, w.self_loop, w.token_own)
            else:
                weight = torch.where(r.is_global, w.global_global, w.token_other)
            src.append(r.nodes)
            dst.append(r.sample * num_b + t if bipartite else layout.global_index[r.sample, t])
            wt.append(weight)
            tok.append(~r.is_global)
    return torch.cat(src), torch.cat(dst), torch.cat(wt).to(torch.float32), torch.cat(tok)


def build_full_graph(counts_per_backbone: Sequence[Tensor],
                     weights: EdgeWeights = EdgeWeights(), undirected: bool = False,
                     num_rows: Optional[Sequence[int]] = None
                     ) -> tuple[Tensor, Tensor, NodeLayout]:
    """All samples' graphs as one disconnected graph.

    Args:
        counts_per_backbone: per backbone, the (N,) row counts (>= 1, global row
            included) of the batch's samples.
        weights: the edge weights.
        undirected: also add every token <- global edge.
        num_rows: per backbone ``counts.sum()`` if known (saves a device sync).

    Returns:
        ``edge_index`` (2, E) over the backbone-major node order, ``edge_attr``
        (E, 1) float32 weights, and the ``NodeLayout``.
    """
    rows, layout = _rows(counts_per_backbone, num_rows)
    src, dst, wt, from_token = _into_globals(rows, layout, weights, bipartite=False)
    srcs, dsts, wts = [src], [dst], [wt]
    tokens = torch.cat([r.nodes[~r.is_global] for r in rows])
    srcs.append(tokens)  # self-loops of the token nodes
    dsts.append(tokens)
    wts.append(torch.full(tokens.shape, weights.self_loop, dtype=torch.float32,
                          device=tokens.device))
    if undirected:
        srcs.append(dst[from_token])
        dsts.append(src[from_token])
        wts.append(wt[from_token])
    edge_index = torch.stack([torch.cat(srcs), torch.cat(dsts)])
    return edge_index, torch.cat(wts).unsqueeze(1), layout


def build_global_graph(counts_per_backbone: Sequence[Tensor],
                       weights: EdgeWeights = EdgeWeights(),
                       num_rows: Optional[Sequence[int]] = None
                       ) -> tuple[Tensor, Tensor, NodeLayout]:
    """The bipartite graph of the full graph's edges that end in a global node.

    Sources are all nodes (backbone-major order, as ``build_full_graph``);
    targets are the N*B global nodes, target ``i * B + b`` being ``c_b`` of
    sample i, i.e. node ``layout.global_index.reshape(-1)[i * B + b]``. Use as
    ``conv((x, x[layout.global_index.reshape(-1)]), edge_index, edge_attr)``.
    The same graph serves ``undirected`` (see the module docstring).
    """
    rows, layout = _rows(counts_per_backbone, num_rows)
    src, dst, wt, _ = _into_globals(rows, layout, weights, bipartite=True)
    return torch.stack([src, dst]), wt.unsqueeze(1), layout

