"""HADA's training losses: id-targeted contrastive (ITC), hard-negative sampling and matching (ITM).

The losses compute in float32 (inputs are cast), so callers may hold bfloat16 activations under autocast;
:func:`itc_loss_against_queues` takes float32 features (the model calls it with autocast off).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluate.weighted import mix_scores
from fuse import compiled


def id_targets(ids: Tensor, all_ids: Tensor) -> Tensor:
    """Soft ITC targets (N, M): every entry of ``all_ids`` equal to the row's id shares the row's mass equally
    (so every caption of an image is a positive). Negative ids (the queue's initial entries) never match."""
    pos = (ids.view(-1, 1) == all_ids.view(1, -1)) & (all_ids.view(1, -1) >= 0)
    pos = pos.to(torch.float32)
    # Rows always match themselves when ``all_ids`` starts with ``ids``; clamp guards the rest.
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets: Tensor) -> Tensor:
    """ALBEF's contrastive loss, (i2t + t2i) / 2, on temperature-scaled logits.

    Rows of both are the batch's pairs keyed by their image id, columns batch +
    queue entries, so one target matrix serves both directions.
    """
    return 0.5 * (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets))


Products = Union[Tensor, Sequence[Tensor]]  # (N, N + Q), or its column blocks (batch, then queue)


def _columns(p: Products) -> Tensor:
    return p if isinstance(p, Tensor) else torch.cat(p, dim=1)


def _itc_from_products(p_i2t: Products, p_t2i: Products, temp: Tensor, ids: Tensor, all_ids: Tensor,
                       first_i2t: Optional[Products], first_t2i: Optional[Products], w: Optional[Tensor]) -> Tensor:
    targets = id_targets(ids, all_ids)
    sim_i2t, sim_t2i = _columns(p_i2t) / temp, _columns(p_t2i) / temp
    if w is not None:
        sim_i2t = mix_scores(sim_i2t, _columns(first_i2t) / temp, w)
        sim_t2i = mix_scores(sim_t2i, _columns(first_t2i) / temp, w)
    return itc_loss(sim_i2t, sim_t2i, targets)


def itc_loss_from_products(p_i2t: Products, p_t2i: Products, temp: Tensor, ids: Tensor, all_ids: Tensor,
                           first: Optional[tuple[Products, Products]] = None, w: Optional[Tensor] = None,
                           impl: Optional[str] = None) -> Tensor:
    """:func:`itc_loss` of the products ``p`` (rows: the batch, columns: batch + queue; or a sequence of column
    blocks, joined inside the fused passes) divided by ``temp``, with :func:`id_targets` of ``ids`` against
    ``all_ids``; in the weighted stage the logits are ``mix_scores(p / temp, first / temp, w)``.

    The same expressions, ``torch.compile``'d by default (``fuse.compiled``; ``impl`` as there): the eager
    version makes a dozen passes over (N, N + Q) tensors, each a fresh allocation, where the compiled one
    makes a few fused ones.
    """
    if (first is None) != (w is None):
        raise ValueError("the weighted ITC loss needs both the first backbone's products and w")
    args = (p_i2t, p_t2i, temp, ids, all_ids, *(first or (None, None)), w)
    ok, loss = compiled.try_compiled(impl, "loss.itc", _itc_from_products, *args)
    return loss if ok else _itc_from_products(*args)


class QueueSide(NamedTuple):
    """One side of the contrastive pairs: the online features (N, D) whose gradient the loss gives, the momentum
    features (N, D) and the queue (D, Q) they are compared against (the *other* side's)."""

    online: Tensor
    keys: Tensor
    queue: Tensor

    def products(self, online: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(online @ keys.T, online @ queue): the batch's and the queue's columns, the queue read where it is."""
        x = self.online if online is None else online
        return x @ self.keys.t(), x @ self.queue

    def online_grad(self, d_batch: Tensor, d_queue: Tensor) -> Tensor:
        """The gradient of the online features from those of their products. The queue's part as
        ``(queue @ d_queue.T).T``: the same product, a quarter faster on CPU than ``d_queue @ queue.T`` (BLAS
        runs the long dimension of a skinny product better as its rows)."""
        return d_batch @ self.keys + (self.queue @ d_queue.t()).t()


def itc_loss_against_queues(i2t: QueueSide, t2i: QueueSide, temp: Tensor, ids: Tensor, all_ids: Tensor,
                            first: Optional[tuple[QueueSide, QueueSide]] = None, w: Optional[Tensor] = None,
                            impl: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """HADA's ITC loss of the online image and caption features against the other side's momentum features
    and queue (the weighted stage adds the first backbone's own, ``first``, mixed by ``w``): the
    :func:`itc_loss_from_products` of those products. Also returns the in-batch products (N, N) of both
    directions, detached (hard negatives are drawn from them).

    Where a gradient is wanted (grad mode on and any of the online features, ``temp`` or ``w`` requiring it),
    the loss computes it at once, in its forward (the loss's own backward, then the products' two matrix
    products), whether or not a backward follows, and keeps only the gradients for the backward: so nothing
    the loss reads is saved, the queues are read where they are and not copied, and the caller may enqueue
    right after. Momentum features, queues and ``first`` get no gradient (passing ones that require it is
    an error), and the loss is not twice differentiable. Float32 features.
    """
    no_grad_inputs = [t for side in (i2t, t2i, *(first or ())) for t in (side.keys, side.queue)]
    no_grad_inputs += [side.online for side in first or ()]
    if any(t.requires_grad for t in no_grad_inputs):
        raise ValueError("itc_loss_against_queues gives no gradient to momentum features, queues or the first "
                         "backbone's embeddings; detach them")
    leaves = (i2t.online, t2i.online, temp) + ((w,) if w is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        loss, pb_i2t, pb_t2i = _ItcAgainstQueues.apply(i2t, t2i, ids, all_ids, first, impl, *leaves)
    else:
        with torch.no_grad():
            (pb_i2t, pq_i2t), (pb_t2i, pq_t2i) = i2t.products(), t2i.products()
            firsts = (first[0].products(), first[1].products()) if first is not None else None
            loss = itc_loss_from_products((pb_i2t, pq_i2t), (pb_t2i, pq_t2i), temp, ids, all_ids, firsts, w, impl)
    return loss, pb_i2t.detach(), pb_t2i.detach()


class _ItcAgainstQueues(torch.autograd.Function):
    """:func:`itc_loss_against_queues` with its gradient computed in the forward (see there)."""

    @staticmethod
    def forward(ctx, i2t, t2i, ids, all_ids, first, impl, img, txt, temp, w=None):
        # The products as leaves of a small graph of their own: the loss's backward gives their gradients.
        p_i2t, p_t2i = (tuple(p.requires_grad_() for p in side.products(x.detach()))
                        for side, x in ((i2t, img), (t2i, txt)))
        temp_, w_ = temp.detach().requires_grad_(), w.detach().requires_grad_() if w is not None else None
        firsts = (first[0].products(), first[1].products()) if first is not None else None
        with torch.enable_grad():
            loss = itc_loss_from_products(p_i2t, p_t2i, temp_, ids, all_ids, firsts, w_, impl)
            grads = torch.autograd.grad(loss, [*p_i2t, *p_t2i, temp_] + ([w_] if w is not None else []))
        # The features' gradients only where wanted (each is two (N, Q) x (Q, D) products).
        d_img = i2t.online_grad(*grads[:2]) if ctx.needs_input_grad[6] else None
        d_txt = t2i.online_grad(*grads[2:4]) if ctx.needs_input_grad[7] else None
        ctx.save_for_backward(d_img, d_txt, *grads[4:])
        pb_i2t, pb_t2i = p_i2t[0].detach(), p_t2i[0].detach()
        ctx.mark_non_differentiable(pb_i2t, pb_t2i)
        return loss.detach(), pb_i2t, pb_t2i

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_pb_i2t, _g_pb_t2i):
        grads = [None if g is None else g * g_loss for g in ctx.saved_tensors]
        return (None,) * 6 + tuple(grads)


def sample_hard_negatives(logits: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
    """One negative column per row, drawn with probability softmax(logits) over
    the columns not marked ``same`` (torch.multinomial, so seeded runs repeat).

    Returns (index (N,), has_negative (N,) bool). A row with every column
    ``same`` (e.g. the whole batch shows one image) has no negative: it draws
    uniformly so shapes stay static, and callers must drop it via ``has_negative``.
    """
    # Non-finite logits (a diverged step; the training loop stops at its next check) must not crash here.
    logits = torch.nan_to_num(logits.detach().float(), nan=0.0, posinf=1e4, neginf=-1e4)
    has_neg = ~same.all(dim=1)
    # Mask before the softmax: masking after it underflows to all-zero rows at small temperatures.
    logits = logits.masked_fill(same, float("-inf"))
    logits = torch.where(has_neg.unsqueeze(1), logits, torch.zeros_like(logits))
    probs = F.softmax(logits, dim=1)
    return torch.multinomial(probs, 1).squeeze(1), has_neg


def itm_features(a: Tensor, b: Tensor) -> Tensor:
    """The discriminator input [a, b, |a - b|, a * b]."""
    return torch.cat([a, b, (a - b).abs(), a * b], dim=-1)


def itm_loss(pos_logits: Tensor, neg_logits: Tensor, neg_valid: Tensor) -> Tensor:
    """Binary cross-entropy with logits: positives label 1, negatives 0; the mean
    runs over the positives and the valid negatives only."""
    logits = torch.cat([pos_logits.reshape(-1), neg_logits.reshape(-1)]).float()
    labels = torch.cat([torch.ones_like(pos_logits.reshape(-1)),
                        torch.zeros_like(neg_logits.reshape(-1))]).float()
    weight = torch.cat([torch.ones_like(pos_logits.reshape(-1)),
                        neg_valid.reshape(-1).to(pos_logits.dtype)]).float()
    loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum")
    return loss / weight.sum()
