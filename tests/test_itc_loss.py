"""fuse.losses: ALBEF's ITC loss from raw products (eager and torch.compile'd), and against the queues with its
gradient computed in the forward."""
import pytest
import torch

import fuse.compiled as compiled
from fuse.losses import QueueSide, itc_loss_against_queues, itc_loss_from_products
from tests.itc_oracle import itc_by_hand, plain_itc_against_queues


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
    first = args.get("first")
    return itc_by_hand(args["p_i2t"], args["p_t2i"], args["temp"], args["ids"], args["all_ids"], first,
                       args.get("w"))


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


def queue_case(n=5, d=4, q=7, seed=0, weighted=False):
    """Online features (leaves), momentum features and queues for both directions, temperature, ids with
    repeats against a queue with empty (-100) entries; the first backbone's own and w when weighted."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    img, txt = rand(n, d).requires_grad_(), rand(n, d).requires_grad_()
    ids = torch.randint(0, 3, (n,), generator=g)
    queue_ids = torch.randint(0, 4, (q,), generator=g).masked_fill_(torch.arange(q) % 3 == 0, -100)
    args = dict(i2t=QueueSide(img, rand(n, d), rand(d, q)), t2i=QueueSide(txt, rand(n, d), rand(d, q)),
                temp=torch.tensor(0.5, requires_grad=True), ids=ids, all_ids=torch.cat([ids, queue_ids]))
    if weighted:
        img0, txt0 = rand(n, 3), rand(n, 3)
        args.update(first=(QueueSide(img0, txt0, rand(3, q)), QueueSide(txt0, img0, rand(3, q))),
                    w=torch.tensor(0.3, requires_grad=True))
    return args


def queue_leaves(args):
    return [args["i2t"].online, args["t2i"].online, args["temp"]] + ([args["w"]] if "w" in args else [])


@pytest.mark.parametrize("impl", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_against_queues_equals_plain_autograd(impl, weighted):
    """Value, in-batch products and the gradient of the online features, temperature and w, against the loss
    over copied keys with autograd; the queues may change between forward and backward (as the enqueue does)."""
    args = queue_case(weighted=weighted)
    want, *want_products = plain_itc_against_queues(**args)
    want_grads = torch.autograd.grad(want * 3.0, queue_leaves(args))
    got, *got_products = itc_loss_against_queues(**args, impl=impl)
    for side in (args["i2t"], args["t2i"], *args.get("first", ())):
        side.queue.add_(1.0)  # the enqueue after the forward: must not reach this loss's gradient
    got_grads = torch.autograd.grad(got * 3.0, queue_leaves(args))  # the upstream gradient scales them
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    for g, e in zip(got_products + list(got_grads), want_products + list(want_grads)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in got_grads)
    assert not any(p.requires_grad for p in got_products)


def test_loss_against_queues_without_grad_computes_the_loss_alone(monkeypatch):
    args = queue_case(weighted=True)
    want = plain_itc_against_queues(**args)[0].detach()
    monkeypatch.setattr(torch.autograd, "grad", None)  # would fail if a gradient were computed
    with torch.no_grad():
        got, *_ = itc_loss_against_queues(**args, impl="eager")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for leaf in queue_leaves(args):
        leaf.requires_grad_(False)
    torch.testing.assert_close(itc_loss_against_queues(**args, impl="eager")[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("needs", ["temp", "img", "w"])
def test_loss_against_queues_gives_each_gradient_alone(needs):
    """Only one input requires a gradient: that one is right, and the others get none."""
    args = queue_case(weighted=True)
    for leaf in queue_leaves(args):
        leaf.requires_grad_(False)
    leaf = {"temp": args["temp"], "img": args["i2t"].online, "w": args["w"]}[needs].requires_grad_()
    want = torch.autograd.grad(plain_itc_against_queues(**args)[0], leaf)[0]
    itc_loss_against_queues(**args, impl="eager")[0].backward()
    torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-6)
    assert all(t.grad is None for t in queue_leaves(args) if t is not leaf)


def test_loss_against_queues_refuses_inputs_it_would_not_differentiate():
    args = queue_case()
    args["t2i"] = args["t2i"]._replace(keys=args["t2i"].keys.clone().requires_grad_())
    with pytest.raises(ValueError, match="no gradient to momentum features"):
        itc_loss_against_queues(**args, impl="eager")
