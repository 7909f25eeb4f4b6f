"""fuse.losses.itc_loss_from_products: ALBEF's ITC loss from raw products, eager and torch.compile'd."""
import pytest
import torch

import fuse.compiled as compiled
from fuse.losses import itc_loss_from_products


def case(n=6, q=9, seed=0, weighted=False):
    """Products (batch x (batch + queue)) for both directions, temperature, ids with repeats and empty queue
    entries, and the first backbone's products and w when weighted; all leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    ids = torch.randint(0, 4, (n,), generator=g)
    queue_ids = torch.randint(-1, 4, (q,), generator=g).masked_fill_(torch.arange(q) % 3 == 0, -100)
    args = dict(p_i2t=leaf(n, n + q), p_t2i=leaf(n, n + q), temp=torch.tensor(0.07, requires_grad=True),
                ids=ids, all_ids=torch.cat([ids, queue_ids]))
    if weighted:
        args.update(first=(leaf(n, n + q), leaf(n, n + q)), w=torch.tensor(0.3, requires_grad=True))
    return args


def leaves(args):
    out = [args["p_i2t"], args["p_t2i"], args["temp"]]
    if "w" in args:
        out += [*args["first"], args["w"]]
    return out


def value_and_grads(args, **kw):
    loss = itc_loss_from_products(**args, **kw)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves(args)))


def by_hand(args):
    """The loss written out: soft targets over every column with the row's image id, the mean over rows of
    -sum(targets * log_softmax(logits)), averaged over the two directions."""
    ids, all_ids, temp = args["ids"], args["all_ids"], args["temp"]
    pos = ((ids[:, None] == all_ids[None]) & (all_ids[None] >= 0)).float()
    targets = pos / pos.sum(1, keepdim=True)
    total = 0.0
    for k, p in enumerate((args["p_i2t"], args["p_t2i"])):
        logits = p / temp
        if "w" in args:
            logits = (1 - args["w"]) * logits + args["w"] * args["first"][k] / temp
        total = total - (targets * torch.log_softmax(logits, 1)).sum(1).mean() / 2
    return total


@pytest.mark.parametrize("weighted", [False, True])
def test_eager_loss_is_the_soft_target_cross_entropy(weighted):
    args = case(weighted=weighted)
    got = value_and_grads(args, impl="eager")
    want = by_hand(args)
    expected = [want.detach()] + list(torch.autograd.grad(want, leaves(args)))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert got[3].abs() > 0 and got[-1].abs() > 0  # the temperature and (weighted) w get a gradient


def test_first_products_and_w_come_together():
    args = case()
    with pytest.raises(ValueError, match="both"):
        itc_loss_from_products(**args, w=torch.tensor(0.3), impl="eager")


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def failing_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    monkeypatch.setattr(torch, "compile", failing_compile)
    args = case()
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        got = value_and_grads(args, impl="auto")
    for g, e in zip(got, value_and_grads(args, impl="eager")):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert compiled._compiled.error is not None


@pytest.mark.slow
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_loss_matches_eager(monkeypatch, weighted):
    """The torch.compile'd loss (dynamic shapes: one compile serves both sizes) against the eager one."""
    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    for n, q, seed in ((6, 9, 0), (11, 40, 1)):
        args = case(n, q, seed, weighted)
        got = value_and_grads(args, impl="compiled")
        for g, e in zip(got, value_and_grads(args, impl="eager")):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert set(compiled._compiled._fns) == {"loss.itc"}
