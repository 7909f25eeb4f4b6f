"""One GATv2 layer on HADA's star graphs, dense per sample, without per-edge (E, H, C) tensors.

HADA reads out only the global nodes, and every node of a sample (its own row
included, as the self-loop) is a source of every global node of that sample.
Per sample n the layer is therefore dense attention of T targets over S sources.
:func:`star_gatv2` computes exactly what PyG's ``GATv2Conv.forward`` computes on
that bipartite edge list (``add_self_loops=False``), for targets ``t`` and
sources ``s`` (``lin_*`` and ``att``, ``bias`` are the conv's parameters)::

    x_l = lin_l(x_src)                                  (N, S, H, C)
    x_r = lin_r(x_dst)                                  (N, T, H, C)
    z[n, t, s] = x_l[n, s] + x_r[n, t] + e[n, t, s] * w (H, C), w = lin_edge.weight
    score[n, t, s, h] = sum_c att[h, c] * leaky_relu(z[n, t, s, h, c])
    alpha = dropout(softmax over the real s of score)   (N, T, S, H), float32
    out[n, t, h] = sum_s alpha[n, t, s, h] * x_l[n, s, h] (concat heads) + bias

PyG materialises ``z`` and several other per-edge (N*T*S, H, C) tensors and keeps
them for backward. Here a custom autograd function keeps only ``x_l``, ``x_r``
and (N, T, S, H) attention tensors, and recomputes ``z`` in backward. Per step,
after the projections, it makes five passes over ``x_l``-sized data and stores
nothing larger than ``x_l``; each pass reads ``x_l`` once, for all T targets:

* forward: scores (elementwise + reduction over c, per target), masked softmax
  over s in float32, dropout, messages (reduction over s);
* backward: ``d alpha`` (reduction over c), softmax backward, one pass writing
  ``d x_l`` (message and score terms together), one reduction over s giving
  ``d x_r``, ``d lin_edge.weight`` and ``d att`` (of the relu part of
  ``leaky(z) = s*z + (1-s)*relu(z)`` only; the linear part comes from sums of
  the score gradient).

Layouts. :func:`star_gatv2` takes padded sources (N, S, F). :func:`star_gatv2_rows`
takes them as the rows of a stacked (R, F) matrix (HADA's encoder: every
backbone's projected rows, one after the other) and a :class:`Sources` index that
places each row in its sample's slot: ``lin_l`` runs on the rows as they are, and
the passes read ``x_l[row[n, s]]`` where ``lin_l`` wrote it and write ``d x_l``
row by row. With the compiled passes no padded copy, transpose or zero-fill of the
sources or of ``x_l`` is made, forward or backward, and padding slots cost no
``lin_l`` work. ``lin_l``'s bias is not written over ``x_l`` either (``addmm``
would first copy it into the whole output): it joins ``x_r`` in ``z`` and adds
``b_l * sum_s alpha`` to the messages, the same sums regrouped.

Two implementations of those passes:

* ``compiled``: ``torch.compile`` of whole-tensor expressions; inductor turns
  each into one loop nest that never stores a (N, T, S, H, C) tensor (C++/OpenMP
  on CPU, Triton on GPU); the row index is an indexed load inside it. Compiled
  lazily on first use (about 10-60 s in all on a 2-core CPU, cached on disk by
  inductor); shapes are dynamic, so new batch or token counts do not recompile
  (sizes 0/1, T, dtypes and devices do).
* ``eager``: plain PyTorch on blocks of at most ``chunk_elems`` elements of
  ``z``, in place where possible, messages and ``d alpha`` by per-head batched
  matmuls. It uses ``leaky(z) = s*z + (1-s)*relu(z)``: the linear part
  factorises into dot products with ``att``, only the relu part needs ``z``.
  It works on the padded layout: :func:`star_gatv2_rows` pads its input rows
  for it (the old layout, one F-wide copy each way). Should compiling fail
  inside a call, that call's eager passes gather ``x_l`` into the padded layout.

On CPU in float32, ``compiled`` (and ``auto``) runs the passes as two C++ loops
instead (:mod:`fuse.native`): a forward with an online softmax and a backward that
reads ``x_l`` once, each streaming the rows in the order ``lin_l`` wrote them. A
backward that must return the edge attribute's gradient uses the compiled passes.

``impl="auto"`` (the default) uses ``compiled`` and falls back to ``eager``,
with a warning, for the rest of the process if compiling fails (``fuse.compiled``,
shared with the ITC loss). The default can be changed with :func:`set_default_impl`
or the ``FUSE_ATTENTION_IMPL`` environment variable (``auto``, ``compiled``, ``eager``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fuse import compiled, native
from fuse.compiled import IMPLS, set_default_impl  # noqa: F401  (this module's impl switch, re-exported)


def default_chunk_elems(device: torch.device) -> int:
    """Elements of ``z`` per eager chunk: cache-sized on CPU, large on GPUs."""
    return 1 << 18 if device.type == "cpu" else 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax and parameter gradients: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Sources(NamedTuple):
    """Where each sample's sources are: rows of a stacked (R, F) matrix, placed in (N, S) slots.

    Every row is in exactly one slot; a slot holds at most one row. The passes read ``x_l`` in this row layout
    (the layout ``lin_l`` writes), so nothing is copied into a padded (N, S, ...) tensor.
    """

    row: Tensor  # (N, S) int64: the row in slot s of sample n (any valid row where not ``mask``)
    mask: Tensor  # (N, S) bool: the slot holds a source
    slot: Tensor  # (R,) int64: the flat slot n * S + s of each row

    @classmethod
    def padded(cls, mask: Tensor) -> "Sources":
        """Rows that are the N * S slots in order (padding slots included, as rows)."""
        flat = torch.arange(mask.numel(), device=mask.device)
        return cls(flat.view(mask.shape), mask, flat)


# --------------------------------------------------------------------------------------
# Whole-tensor expressions of the fused passes: the sources that torch.compile fuses.
# Shapes: x_l (R, H, C) rows, row (N, S) the row in each slot (x_l[row] is inlined into
# each loop nest as an indexed load, never stored), sample and slot (R,) each row's
# place, x_r (N, T, H, C), e (N, T, S), w and att (H, C) in the compute dtype, g (score
# gradient) and alpha (N, T, S, H), g_out (N, T, H, C).
# Python loops over T unroll (T is 2 or 3), so every pass is one loop nest over x_l.
# --------------------------------------------------------------------------------------

def _per_target(fn, t: int) -> Tensor:
    """stack([fn(0), ..., fn(t - 1)], 1): one expression per target, so that inductor puts every target's
    reduction in the loop nest that loads x_l once (a (N, T, S, ...) expression reads it T times)."""
    return torch.stack([fn(k) for k in range(t)], 1)


def _fused_scores(x_l: Tensor, row: Tensor, x_r: Tensor, e: Tensor, w: Tensor, att: Tensor,
                  slope: float) -> Tensor:
    ct = att.dtype
    xs = x_l[row].to(ct)
    return _per_target(lambda t: (F.leaky_relu(xs + x_r[:, t, None].to(ct) + e[:, t, :, None, None] * w, slope)
                                  * att).sum(-1), x_r.size(1))


def _fused_messages(alpha: Tensor, x_l: Tensor, row: Tensor) -> Tensor:
    """out[n, t, h] = sum_s alpha[n, t, s, h] * x_l[row[n, s], h], in x_l's dtype."""
    xs = x_l[row].to(alpha.dtype)
    return _per_target(lambda t: (alpha[:, t, ..., None] * xs).sum(1), alpha.size(1)).to(x_l.dtype)


def _fused_grad_alpha(g_out: Tensor, x_l: Tensor, row: Tensor, ct: torch.dtype) -> Tensor:
    """d alpha[n, t, s, h] = g_out[n, t, h] . x_l[row[n, s], h], in the compute dtype."""
    xs = x_l[row].to(ct)
    return _per_target(lambda t: (xs * g_out[:, t, None].to(ct)).sum(-1), g_out.size(1))


def _fused_grad_src(x_l: Tensor, sample: Tensor, slot: Tensor, x_r: Tensor, e: Tensor, w: Tensor, att: Tensor,
                    g: Tensor, alpha: Tensor, g_out: Tensor, slope: float) -> Tensor:
    """d x_l, row by row (R, H, C), for row r in slot s of sample n:
    sum_t [alpha[n, t, s] * g_out[n, t] (message) + att * leaky'(z) * g[n, t, s] (score)]."""
    ct = att.dtype
    x = x_l.to(ct)
    acc = None
    for t in range(x_r.size(1)):
        z = x + x_r[sample, t].to(ct) + e[sample, t, slot][:, None, None] * w
        gt = g[sample, t, slot].unsqueeze(-1) * att
        term = (torch.where(z > 0, gt, slope * gt)
                + alpha[sample, t, slot].unsqueeze(-1) * g_out[sample, t].to(ct))
        acc = term if acc is None else acc + term
    return acc.to(x_l.dtype)


def _fused_grad_dst(x_l: Tensor, row: Tensor, x_r: Tensor, e: Tensor, w: Tensor, att: Tensor, g: Tensor,
                    slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(d x_r, d w, d att), with leaky(z) = slope * z + (1 - slope) * relu(z): only the relu part needs z per
    element, p = [z > 0] * g. Four sums over s per sample, one loop nest (z computed once per element and
    target); the linear parts come from sums of g."""
    ct = att.dtype
    xs = x_l[row].to(ct)
    t = x_r.size(1)
    z = [xs + x_r[:, k, None].to(ct) + e[:, k, :, None, None] * w for k in range(t)]
    p = [torch.where(z[k] > 0, g[:, k, ..., None], 0.0) for k in range(t)]
    p_sum = _per_target(lambda k: p[k].sum(1), t)  # (N, T, H, C)
    pe_sum = _per_target(lambda k: (p[k] * e[:, k, :, None, None]).sum(1), t).sum((0, 1))
    pz_sum = _per_target(lambda k: (p[k] * z[k]).sum(1), t).sum((0, 1))
    gx_sum = (g.sum(1).unsqueeze(-1) * xs).sum(1).sum(0)  # sum_{n, s} (sum_t g) x_l: z's x_l part
    return _grad_dst_from_sums(p_sum, pe_sum, pz_sum, gx_sum, x_r, e, w, att, g, slope)


def _grad_dst_from_sums(p_sum: Tensor, pe_sum: Tensor, pz_sum: Tensor, gx_sum: Tensor, x_r: Tensor, e: Tensor,
                        w: Tensor, att: Tensor, g: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(d x_r, d w, d att) from the sums over s of the relu part (p = [z > 0] g: p_sum (N, T, H, C), pe_sum,
    pz_sum and gx_sum = sum (sum_t g) x_l (H, C)) and the linear part's sums of g."""
    q, g_dst = 1.0 - slope, g.sum(2).unsqueeze(-1)  # (N, T, H, 1)
    ge = (g * e.unsqueeze(-1)).sum((0, 1, 2)).unsqueeze(-1)  # (H, 1)
    gz_sum = gx_sum + (g_dst * x_r.to(att.dtype)).sum((0, 1)) + ge * w  # sum of g * z
    return (q * p_sum + slope * g_dst) * att, (q * pe_sum + slope * ge) * att, q * pz_sum + slope * gz_sum


def _fused_grad_edge(x_l: Tensor, row: Tensor, x_r: Tensor, e: Tensor, w: Tensor, att: Tensor, g: Tensor,
                     slope: float) -> Tensor:
    """d e[n, t, s] = sum_{h, c} g * leaky'(z) * att * w."""
    ct = att.dtype
    z = x_l[row].unsqueeze(1).to(ct) + x_r.unsqueeze(2).to(ct) + e[..., None, None] * w
    aw = att * w
    return (torch.where(z > 0, aw, slope * aw).sum(-1) * g).sum(-1)


# --------------------------------------------------------------------------------------
# Eager, chunked versions of the same passes, on x_l in the padded layout (N, S, H, C).
# --------------------------------------------------------------------------------------

def _chunks(n: int, t: int, s: int, row: int, budget: int):
    """(n0, n1, s0, s1) blocks whose z (n1-n0, t, s1-s0, row) has <= budget elements
    (at least one source row)."""
    per_s = t * row
    sb = max(1, min(s, budget // per_s))
    nb = max(1, budget // (per_s * s)) if sb == s else 1
    for n0 in range(0, n, nb):
        for s0 in range(0, s, sb):
            yield n0, min(n, n0 + nb), s0, min(s, s0 + sb)


def _relu_z(x_l, x_r, e, w, n0, n1, s0, s1):
    """relu(z) of one block, (nb, T, sb, H, C) in the compute dtype (a fresh tensor)."""
    z = x_r[n0:n1, :, None].to(w.dtype) + x_l[n0:n1, None, s0:s1]
    z.addcmul_(e[n0:n1, :, s0:s1, None, None], w)
    return z.relu_()


def _head_dot(x: Tensor, v: Tensor) -> Tensor:
    """x (..., H, C) . v (H, C) -> (..., H), one matrix-vector product per head."""
    out = x.new_empty(x.shape[:-1], dtype=v.dtype)
    for h in range(v.size(0)):
        out[..., h] = x[..., h, :].to(v.dtype) @ v[h]
    return out


def _eager_scores(x_l, x_r, e, w, att, slope, chunk):
    # Linear part: slope * att . (x_l + x_r + e w), from dot products.
    lin = (_head_dot(x_l, att).unsqueeze(1) + _head_dot(x_r, att).unsqueeze(2)
           + e.unsqueeze(-1) * (att * w).sum(-1))
    n, t, s, hh, c = *e.shape, *att.shape
    scores = lin.mul_(slope)
    for n0, n1, s0, s1 in _chunks(n, t, s, hh * c, chunk):
        r = _relu_z(x_l, x_r, e, w, n0, n1, s0, s1)
        scores[n0:n1, :, s0:s1] += torch.linalg.vecdot(r, att).mul_(1 - slope)
    return scores


def _eager_messages(alpha: Tensor, x_l: Tensor) -> Tensor:
    """Per-head batched matmuls (N, T, S) @ (N, S, C), in x_l's dtype."""
    a = alpha.to(x_l.dtype)
    n, s, hh, c = x_l.shape
    out = x_l.new_empty(n, alpha.size(1), hh, c)
    for h in range(hh):
        torch.bmm(a[..., h], x_l[:, :, h], out=out[:, :, h])
    return out


def _eager_grad_alpha(g_out: Tensor, x_l: Tensor, ct: torch.dtype) -> Tensor:
    go = g_out.to(x_l.dtype)
    n, s, hh, c = x_l.shape
    g_alpha = torch.empty(n, g_out.size(1), s, hh, dtype=ct, device=x_l.device)
    for h in range(hh):
        g_alpha[..., h] = torch.bmm(go[:, :, h], x_l[:, :, h].transpose(1, 2))
    return g_alpha


def _eager_grads(x_l, x_r, e, w, att, g, alpha, g_out, slope, chunk, need_edge):
    """(d x_l, d x_r, d w, d att, d e or None), with the leaky_relu split of the forward:
    only the relu part needs z; p = g * [z > 0] carries it."""
    n, t, s, hh, c = *e.shape, *att.shape
    ct = att.dtype
    q = 1 - slope
    g_src, g_dst = g.sum(1), g.sum(2)  # (N, S, H), (N, T, H)
    ge_sum = (g * e.unsqueeze(-1)).sum((0, 1, 2))  # (H,)
    gx_l = torch.empty(n, s, hh, c, dtype=ct, device=x_l.device)
    gx_r = torch.zeros(n, t, hh, c, dtype=ct, device=x_l.device)
    gw = torch.zeros(hh * c, dtype=ct, device=x_l.device)
    gatt = torch.zeros(hh, c, dtype=ct, device=x_l.device)
    ge = (slope * g * (att * w).sum(-1)).sum(-1) if need_edge else None
    go = g_out.to(ct)
    qatt, satt = q * att, slope * att
    for n0, n1, s0, s1 in _chunks(n, t, s, hh * c, chunk):
        r = _relu_z(x_l, x_r, e, w, n0, n1, s0, s1)
        gb = g[n0:n1, :, s0:s1]
        m = gb.numel() // hh
        # sum of g * relu(z) per head as one (H, m) @ (m, H*C) GEMM and its diagonal blocks:
        # H times the flops of per-head products, which (strided GEMVs) run slower.
        gatt += (gb.reshape(m, hh).t() @ r.view(m, hh * c)).view(hh, hh, c).diagonal().t()
        p = r.sign_().mul_(gb.unsqueeze(-1))  # relu(z) >= 0, so sign() is [z > 0]
        gx_r[n0:n1] += p.sum(2)
        gw += e[n0:n1, :, s0:s1].reshape(m) @ p.view(m, hh * c)
        if need_edge:
            ge[n0:n1, :, s0:s1] += (p.view(m, hh * c) @ (qatt * w).view(-1)).view(gb.shape[:-1])
        # d x_l = att * (q * sum_t p + slope * sum_t g) + sum_t alpha * g_out (the message);
        # T is small, so the message term is T fused multiply-adds, not a K = T matmul.
        blk = gx_l[n0:n1, s0:s1]
        torch.sum(p, 1, out=blk)
        blk.mul_(qatt).addcmul_(g_src[n0:n1, s0:s1].unsqueeze(-1), satt)
        for k in range(t):
            blk.addcmul_(alpha[n0:n1, k, s0:s1].unsqueeze(-1), go[n0:n1, k].unsqueeze(1))
    # The linear parts of d x_r, d w and d att, from the per-row sums of g.
    gx_r.mul_(q).add_(slope * g_dst.unsqueeze(-1)).mul_(att)
    gw = (q * gw.view(hh, c) + slope * ge_sum.unsqueeze(-1)) * att
    lin_att = (g_dst.unsqueeze(-1) * x_r.to(ct)).sum((0, 1)) + ge_sum.unsqueeze(-1) * w
    for h in range(hh):  # sum_{n,s} g_src * x_l, one pass over x_l
        lin_att[h] += g_src[..., h].reshape(-1) @ x_l[:, :, h].reshape(-1, c).to(ct)
    gatt = q * gatt + slope * lin_att
    return gx_l.to(x_l.dtype), gx_r, gw, gatt, ge


# --------------------------------------------------------------------------------------
# Dispatch between the two.
# --------------------------------------------------------------------------------------

# Inductor stores a pointwise result that several users read when it has more than
# ``realize_reads_threshold`` (4) inputs: with the row index, ``z`` has five (x_l, row, x_r, e,
# w) and would be stored whole, (N, T, S, H, C). A higher threshold keeps it in registers.
# Its bounds check of every indexed load costs 10-20% of a pass; star_gatv2_rows checks the
# indices once per call instead.
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 8, "assert_indirect_indexing": False}


class _Kernels:
    """The fused passes for one call: compiled, eager, or compiled with eager fallback.

    The compiled passes read ``x_l`` in the row layout of ``src``; the eager ones need the padded layout
    (N, S, H, C): a view when the rows are the padded slots, else one gather per forward and per backward
    (the eager fallback's only full-size copies), and the gradient gathered back to rows.
    """

    def __init__(self, impl: str, chunk: int, src: Sources, padded: bool, native: bool = False):
        self.impl, self.chunk, self.src, self.padded, self.native = impl, chunk, src, padded, native
        self._gathered: Optional[tuple[Tensor, Tensor]] = None

    def _try_compiled(self, name, fn, *args):
        """(True, result) from the compiled pass, or (False, None) to run eager."""
        return compiled.try_compiled(self.impl, f"attention.{name}", fn, *args, options=_INDUCTOR_OPTIONS)

    def to_padded(self, x_l: Tensor) -> Tensor:
        """x_l (R, H, C) as (N, S, H, C) for the eager passes; a gather is kept until ``release``."""
        if self.padded:
            return x_l.view(*self.src.mask.shape, *x_l.shape[1:])
        if self._gathered is None or self._gathered[0] is not x_l:
            self._gathered = (x_l, x_l[self.src.row])
        return self._gathered[1]

    def to_rows(self, x: Tensor) -> Tensor:
        """(N, S, H, C) -> the rows (R, H, C)."""
        flat = x.flatten(0, 1)
        return flat if self.padded else flat.index_select(0, self.src.slot)

    def release(self) -> None:
        self._gathered = None

    def scores(self, x_l, x_r, e, w, att, slope):
        ok, out = self._try_compiled("scores", _fused_scores, x_l, self.src.row, x_r, e, w, att, slope)
        return out if ok else _eager_scores(self.to_padded(x_l), x_r, e, w, att, slope, self.chunk)

    def messages(self, alpha, x_l):
        ok, out = self._try_compiled("messages", _fused_messages, alpha, x_l, self.src.row)
        return out if ok else _eager_messages(alpha, self.to_padded(x_l))

    def grad_alpha(self, g_out, x_l, ct):
        ok, out = self._try_compiled("grad_alpha", _fused_grad_alpha, g_out, x_l, self.src.row, ct)
        return out if ok else _eager_grad_alpha(g_out, self.to_padded(x_l), ct)

    def grads(self, x_l, x_r, e, w, att, g, alpha, g_out, slope, need_edge):
        row, slots = self.src.row, self.src.row.size(1)
        sample, slot = self.src.slot.div(slots, rounding_mode="floor"), self.src.slot.remainder(slots)
        ok, gx_l = self._try_compiled("grad_src", _fused_grad_src,
                                      x_l, sample, slot, x_r, e, w, att, g, alpha, g_out, slope)
        if ok:
            ok, dst = self._try_compiled("grad_dst", _fused_grad_dst, x_l, row, x_r, e, w, att, g, slope)
        if ok and need_edge:
            ok, ge = self._try_compiled("grad_edge", _fused_grad_edge, x_l, row, x_r, e, w, att, g, slope)
        if ok:
            return (gx_l, *dst, ge if need_edge else None)
        gx_l, *rest = _eager_grads(self.to_padded(x_l), x_r, e, w, att, g, alpha, g_out, slope, self.chunk,
                                   need_edge)
        return (self.to_rows(gx_l), *rest)


class _StarAttention(torch.autograd.Function):
    """(messages (N, T, H, C), sum over s of the attention (N, T, H)) from x_l (R, H, C) rows, x_r, masked edge
    attrs, lin_edge weight and att; where the rows sit is ``kernels.src``."""

    @staticmethod
    def forward(ctx, x_l, x_r, e, w, att, slope, p, training, kernels):
        ctx.set_materialize_grads(False)
        with torch.autocast(x_l.device.type, enabled=False):  # dtypes are chosen here
            noise = None
            if training and p > 0:
                # Inverted dropout as F.dropout draws it (same mask for the same RNG state on CPU).
                noise = torch.empty(*e.shape, att.size(0), dtype=att.dtype, device=att.device)
                noise = noise.zero_() if p >= 1 else noise.bernoulli_(1 - p).div_(1 - p)
            if kernels.native:
                src = kernels.src
                alpha, alpha_d, out = native.forward(x_l, src.row, src.mask, x_r, e, w, att, slope, noise)
            else:
                scores = kernels.scores(x_l, x_r, e, w, att, slope)  # (N, T, S, H)
                scores.masked_fill_(~kernels.src.mask[:, None, :, None], float("-inf"))
                alpha = torch.softmax(scores, dim=2)
                alpha_d = alpha if noise is None else alpha * noise
                out = kernels.messages(alpha_d, x_l)  # (N, T, H, C)
                kernels.release()
        # The C++ backward takes sum_s alpha * d alpha from the messages instead of a second read of x_l.
        ctx.save_for_backward(x_l, x_r, e, w, att, alpha, alpha_d, noise, out if kernels.native else None)
        ctx.slope, ctx.kernels = slope, kernels
        return out, alpha_d.sum(2)

    @staticmethod
    def backward(ctx, g_out, g_sum):
        x_l, x_r, e, w, att, alpha, alpha_d, noise, messages = ctx.saved_tensors
        if g_out is None:
            g_out = x_l.new_zeros(*alpha.shape, x_l.size(-1))
        with torch.autocast(x_l.device.type, enabled=False):
            g_out = g_out.contiguous()
            kernels, need_edge = ctx.kernels, ctx.needs_input_grad[2]
            if kernels.native and not need_edge:  # the C++ loops have no d e
                src = kernels.src
                gx_l, g, *sums = native.backward(x_l, src.row, src.mask, x_r, e, w, att, ctx.slope, alpha, alpha_d,
                                                 noise, messages, g_out, g_sum, kernels.padded)
                (gx_r, gw, gatt), ge = _grad_dst_from_sums(*sums, x_r, e, w, att, g, ctx.slope), None
            else:
                g_alpha = kernels.grad_alpha(g_out, x_l, alpha.dtype)  # d loss / d alpha_d
                if g_sum is not None:
                    g_alpha += g_sum.unsqueeze(2)
                if noise is not None:
                    g_alpha.mul_(noise)
                # Softmax backward over s; masked sources have alpha = 0 and get g = 0.
                g = alpha * (g_alpha - (alpha * g_alpha).sum(2, keepdim=True))
                gx_l, gx_r, gw, gatt, ge = kernels.grads(x_l, x_r, e, w, att, g, alpha_d, g_out, ctx.slope, need_edge)
                kernels.release()
        return (gx_l, gx_r.to(x_r.dtype), None if ge is None else ge.to(e.dtype),
                gw.to(w.dtype), gatt.to(att.dtype), None, None, None, None)


def implementation(impl: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """What the passes run as for ``dtype`` features on ``device`` under ``impl``, in words (for the logs);
    builds the C++ loops if they apply."""
    if compiled.wants_eager(impl):
        return "eager PyTorch passes"
    if native.ready(device, dtype):
        return "C++ loops (fuse/star_attention.cpp)"
    return "torch.compile'd passes"


def star_gatv2(conv, x_src: Tensor, src_mask: Tensor, x_dst: Tensor, edge_attr: Optional[Tensor],
               *, impl: Optional[str] = None, chunk_elems: Optional[int] = None) -> Tensor:
    """PyG ``GATv2Conv`` on per-sample dense bipartite graphs ("stars").

    Sample n has sources ``x_src[n, s]`` for the ``s`` with ``src_mask[n, s]`` and
    targets ``x_dst[n, t]``; every real source sends an edge to every target of
    its sample, with attribute ``edge_attr[n, t, s]``. Self-loops are not added:
    a target that should attend to itself must also be one of the sources
    (HADA: the global node's own row), with the self-loop's attribute.

    Args:
        conv: a ``torch_geometric.nn.GATv2Conv`` with ``edge_dim`` 1 or None. Its
            ``add_self_loops`` flag is ignored (see above); ``dropout`` applies to
            the attention when ``conv.training``; ``concat``, ``bias``,
            ``residual`` and ``share_weights`` are honoured.
        x_src: (N, S, F_src) source features, padded; padding rows must be finite
            (e.g. zeros) and get zero gradient.
        src_mask: (N, S) bool, True for real sources; every sample needs one.
        x_dst: (N, T, F_dst) target features.
        edge_attr: (N, T, S) (or (N, T, S, 1)) attributes of the edges s -> t;
            padding entries are ignored. None when ``conv.edge_dim`` is None.
        impl: "compiled", "eager" or "auto" (compiled, falling back to eager if
            compiling fails); None uses the default (see :func:`set_default_impl`).
        chunk_elems: eager block size in elements of z (default: by device).

    Returns:
        (N, T, H * C) (or (N, T, C) when ``concat=False``): the conv's output at
        the targets. Under autocast the messages are in the projections' dtype
        (bfloat16) and the float32 bias makes the output float32, as PyG's is.
    """
    if x_src.dim() != 3 or x_dst.dim() != 3 or src_mask.shape != x_src.shape[:2]:
        raise ValueError("need x_src (N, S, F), src_mask (N, S) and x_dst (N, T, F)")
    return _star(conv, x_src.flatten(0, 1), Sources.padded(src_mask), x_dst, edge_attr, impl, chunk_elems,
                 padded=True)


def star_gatv2_rows(conv, x_rows: Tensor, sources: Sources, x_dst: Tensor, edge_attr: Optional[Tensor],
                    *, impl: Optional[str] = None, chunk_elems: Optional[int] = None) -> Tensor:
    """:func:`star_gatv2` with the sources as rows of a stacked matrix, placed in slots by ``sources``.

    ``lin_l`` runs on ``x_rows`` (R, F_src) as they are, and the compiled passes read its output where it lies:
    no padded copy of the sources or of ``x_l``, no padding rows through ``lin_l``. ``edge_attr`` and the
    output are as in :func:`star_gatv2`, with S = ``sources.mask.size(1)``.
    """
    if x_rows.dim() != 2 or x_dst.dim() != 3 or sources.row.shape != sources.mask.shape:
        raise ValueError("need x_rows (R, F), sources.row and sources.mask (N, S) and x_dst (N, T, F)")
    if sources.slot.shape != x_rows.shape[:1]:
        raise ValueError(f"sources.slot must place each of the {x_rows.size(0)} rows, "
                         f"got shape {tuple(sources.slot.shape)}")
    for index, size, name in ((sources.row, x_rows.size(0), "row"), (sources.slot, sources.mask.numel(), "slot")):
        if index.numel():  # the compiled passes load through these without bounds checks
            lo, hi = torch.aminmax(index)
            torch._assert_async((lo >= 0) & (hi < size), f"star_gatv2_rows: sources.{name} out of range")
    if compiled.wants_eager(impl):
        # The eager passes work on the padded layout: pad the inputs (F wide) rather than x_l (H * C wide).
        x_src = x_rows.new_zeros(sources.mask.numel(), x_rows.size(1)).index_copy(0, sources.slot, x_rows)
        return _star(conv, x_src, Sources.padded(sources.mask), x_dst, edge_attr, impl, chunk_elems, padded=True)
    return _star(conv, x_rows, sources, x_dst, edge_attr, impl, chunk_elems, padded=False)


def _star(conv, x_rows: Tensor, src: Sources, x_dst: Tensor, edge_attr: Optional[Tensor], impl: Optional[str],
          chunk_elems: Optional[int], padded: bool) -> Tensor:
    impl = compiled.resolve(impl)
    n, s = src.mask.shape
    t = x_dst.size(1)
    if x_dst.size(0) != n:
        raise ValueError(f"x_src has {n} samples, x_dst {x_dst.size(0)}")
    hh, c = conv.heads, conv.out_channels
    # lin_l's bias is added where x_l is read, not written over all of x_l (addmm first copies the bias into
    # its whole output): z = x_l + (x_r + b_l) + e w, and the messages get b_l * sum_s alpha.
    x_l = F.linear(x_rows, conv.lin_l.weight).view(-1, hh, c)
    x_r = conv.lin_r(x_dst).view(n, t, hh, c)
    b_l = None if conv.lin_l.bias is None else conv.lin_l.bias.view(hh, c)
    if b_l is not None:
        x_r = x_r + b_l
    ct = _compute_dtype(x_l.dtype)
    att = conv.att.view(hh, c).to(ct)
    mask = src.mask.to(torch.bool)
    if conv.lin_edge is not None:
        if conv.lin_edge.in_channels != 1 or edge_attr is None:
            raise ValueError("star_gatv2 needs edge_dim 1 and an (N, T, S) edge_attr")
        if edge_attr.dim() == 4:
            edge_attr = edge_attr.squeeze(-1)
        if edge_attr.shape != (n, t, s):
            raise ValueError(f"edge_attr must be {(n, t, s)}, got {tuple(edge_attr.shape)}")
        w = conv.lin_edge.weight.view(hh, c).to(ct)
        # Padding attributes may be anything (even NaN); they must not reach the sums.
        e = edge_attr.to(ct).masked_fill(~mask.unsqueeze(1), 0)
    else:
        w = att.new_zeros(hh, c)
        e = att.new_zeros(n, t, s)
    chunk = default_chunk_elems(x_l.device) if chunk_elems is None else int(chunk_elems)
    use_native = not compiled.wants_eager(impl) and native.applies(x_l, x_r, ct)
    kernels = _Kernels(impl, chunk, src._replace(mask=mask), padded, native=use_native)
    out, alpha_sum = _StarAttention.apply(x_l, x_r, e, w, att, float(conv.negative_slope), float(conv.dropout),
                                          conv.training, kernels)
    if b_l is not None:
        out = out + alpha_sum.unsqueeze(-1) * b_l
    out = out.reshape(n, t, hh * c) if conv.concat else out.mean(dim=2)
    if conv.res is not None:
        out = out + conv.res(x_dst)
    if conv.bias is not None:
        out = out + conv.bias
    return out
