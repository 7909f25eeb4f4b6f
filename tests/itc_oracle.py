"""HADA's contrastive loss written out with plain autograd: the test oracle for fuse.losses."""
from __future__ import annotations

import torch


def itc_by_hand(p_i2t, p_t2i, temp, ids, all_ids, first=None, w=None):
    """Soft targets over every column with the row's image id (ids < 0 never match), the mean over rows of
    -sum(targets * log_softmax(logits)), averaged over the two directions; logits p / temp, or in the weighted
    stage (1 - w) * p / temp + w * first / temp."""
    pos = ((ids[:, None] == all_ids[None]) & (all_ids[None] >= 0)).float()
    targets = pos / pos.sum(1, keepdim=True)
    total = 0.0
    for k, p in enumerate((p_i2t, p_t2i)):
        logits = p / temp
        if w is not None:
            logits = (1 - w) * logits + w * first[k] / temp
        total = total - (targets * torch.log_softmax(logits, 1)).sum(1).mean() / 2
    return total


def plain_itc_against_queues(i2t, t2i, temp, ids, all_ids, first=None, w=None, impl=None):
    """``fuse.losses.itc_loss_against_queues`` as the reference computes it: each side's keys copied (the
    momentum features, then the queue), the products, the loss, and autograd for everything."""
    def products(side):
        return side.online @ torch.cat([side.keys.t(), side.queue], dim=1)

    p_i2t, p_t2i = products(i2t), products(t2i)
    firsts = (products(first[0]), products(first[1])) if first is not None else None
    n = ids.numel()
    return itc_by_hand(p_i2t, p_t2i, temp, ids, all_ids, firsts, w), p_i2t[:, :n].detach(), p_t2i[:, :n].detach()
