"""fuse.attention.star_gatv2 against PyG's GATv2Conv.forward on the equivalent bipartite edge list."""
import warnings

import pytest
import torch
from torch_geometric.nn import GATv2Conv

import fuse.attention as attention
import fuse.compiled as compiled
from fuse.attention import Sources, star_gatv2, star_gatv2_rows

pytestmark = pytest.mark.usefixtures("one_thread")

F_IN = 6


def make_case(n, s, t, heads, channels=5, seed=0, ragged=True, dtype=torch.float64, **conv_kw):
    """A conv and random star graphs: n samples, <= s sources (>= 1 real), t targets."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(heads=heads, edge_dim=1, add_self_loops=False, dropout=0.0)
    kw.update(conv_kw)
    torch.manual_seed(seed)
    conv = GATv2Conv(F_IN, channels, **kw).to(dtype)
    with torch.no_grad():  # PyG zero-initialises the bias: make it count
        if conv.bias is not None:
            conv.bias.normal_(generator=g)
    counts = torch.randint(1, s + 1, (n,), generator=g) if ragged else torch.full((n,), s)
    mask = torch.arange(s) < counts.unsqueeze(1)
    # Random real rows, zero padding (finite, as star_gatv2 requires); random attributes
    # everywhere, padding included (star_gatv2 must ignore those).
    x_src = torch.randn(n, s, F_IN, generator=g, dtype=dtype) * mask.unsqueeze(-1)
    x_dst = torch.randn(n, t, F_IN, generator=g, dtype=dtype)
    edge_attr = torch.rand(n, t, s, generator=g, dtype=dtype) * 2 - 0.5
    return conv, x_src, mask, x_dst, edge_attr


def pyg_reference(conv, x_src, mask, x_dst, edge_attr):
    """conv.forward with sources n*S + s (real ones only) -> targets n*T + t."""
    n, s, f = x_src.shape
    t = x_dst.size(1)
    nn, tt, ss = torch.nonzero(mask.unsqueeze(1).expand(n, t, s), as_tuple=True)
    edge_index = torch.stack([nn * s + ss, nn * t + tt])
    attr = edge_attr[nn, tt, ss].unsqueeze(1) if edge_attr is not None else None
    out = conv((x_src.reshape(n * s, f), x_dst.reshape(n * t, f)), edge_index, attr)
    return out.view(n, t, -1)


def outputs_and_grads(fn, conv, x_src, mask, x_dst, edge_attr, seed=1):
    """fn's output and the gradients of a fixed random linear loss w.r.t. every input and parameter."""
    leaves = [x_src, x_dst] + ([edge_attr] if edge_attr is not None else [])
    leaves = [x.detach().requires_grad_(True) for x in leaves]
    x_src, x_dst = leaves[:2]
    edge_attr = leaves[2] if edge_attr is not None else None
    out = fn(conv, x_src, mask, x_dst, edge_attr)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = dict(conv.named_parameters())
    grads = torch.autograd.grad((out * weight).sum(), leaves + list(params.values()), allow_unused=True)
    names = ["x_src", "x_dst", "edge_attr"][:len(leaves)] + list(params)
    return out, dict(zip(names, grads))


def eager(conv, *args, **kw):
    return star_gatv2(conv, *args, impl="eager", **kw)


def assert_matches(ref, got, rtol, atol):
    (out_ref, g_ref), (out, g) = ref, got
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert g_ref[name] is not None, name
        torch.testing.assert_close(g[name], g_ref[name], rtol=rtol, atol=atol, msg=name)


SHAPES = [  # (samples, max sources, targets, heads)
    (1, 2, 2, 1), (3, 17, 3, 4), (17, 60, 2, 4), (17, 9, 3, 1),
]


@pytest.mark.parametrize("n,s,t,heads", SHAPES)
@pytest.mark.parametrize("ragged", [True, False])
def test_eager_matches_pyg_float64(n, s, t, heads, ragged):
    case = make_case(n, s, t, heads, ragged=ragged, seed=n + s)
    assert_matches(outputs_and_grads(pyg_reference, *case), outputs_and_grads(eager, *case),
                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,s,t,heads", SHAPES)
def test_eager_matches_pyg_float32(n, s, t, heads):
    case = make_case(n, s, t, heads, channels=16, seed=7 * n + s, dtype=torch.float32)
    assert_matches(outputs_and_grads(pyg_reference, *case), outputs_and_grads(eager, *case),
                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10 ** 9])
def test_eager_chunking_changes_nothing(chunk):
    """Blocks smaller than a source row, uneven, several samples, everything at once."""
    case = make_case(5, 13, 3, 2, seed=3)
    ref = outputs_and_grads(pyg_reference, *case)
    got = outputs_and_grads(lambda *a: star_gatv2(*a, impl="eager", chunk_elems=chunk), *case)
    assert_matches(ref, got, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv_kw", [
    dict(concat=False), dict(residual=True), dict(share_weights=True), dict(bias=False),
    dict(negative_slope=0.05),
])
def test_conv_options_match_pyg(conv_kw):
    case = make_case(4, 11, 2, 3, seed=11, **conv_kw)
    assert_matches(outputs_and_grads(pyg_reference, *case), outputs_and_grads(eager, *case),
                   rtol=1e-10, atol=1e-12)


def test_without_edge_features_matches_pyg():
    conv, x_src, mask, x_dst, _ = make_case(4, 11, 2, 2, seed=12, edge_dim=None)
    assert_matches(outputs_and_grads(pyg_reference, conv, x_src, mask, x_dst, None),
                   outputs_and_grads(eager, conv, x_src, mask, x_dst, None), rtol=1e-10, atol=1e-12)


def test_padding_is_ignored():
    """Other padding values (finite rows, any attributes, NaN included) change nothing, and
    padding rows get zero gradient."""
    conv, x_src, mask, x_dst, edge_attr = make_case(6, 10, 2, 2, seed=4)
    pad = ~mask
    assert pad.any()
    x2 = x_src.masked_fill(pad.unsqueeze(-1), 3.0)
    e2 = edge_attr.masked_fill(pad.unsqueeze(1), float("nan"))
    out1, g1 = outputs_and_grads(eager, conv, x_src, mask, x_dst, edge_attr)
    out2, g2 = outputs_and_grads(eager, conv, x2, mask, x_dst, e2)
    torch.testing.assert_close(out2, out1, rtol=1e-12, atol=1e-12)
    for name in g1:
        if name != "edge_attr":
            torch.testing.assert_close(g2[name], g1[name], rtol=1e-12, atol=1e-12, msg=name)
    assert (g2["x_src"][pad] == 0).all()
    assert (g2["edge_attr"].isnan() | (g2["edge_attr"] == 0))[pad.unsqueeze(1).expand_as(e2)].all()


def test_dropout_matches_pyg_with_the_same_random_state():
    """Train mode, p = 0.4, no padding: the inverted-dropout mask is drawn as F.dropout draws it
    (CPU), so with the same seed the outputs and gradients equal PyG's."""
    case = make_case(3, 8, 2, 2, seed=5, ragged=False, dropout=0.4)
    conv = case[0].train()

    def seeded(fn):
        def run(*args):
            torch.manual_seed(123)
            return fn(*args)
        return run

    ref = outputs_and_grads(seeded(pyg_reference), *case)
    got = outputs_and_grads(seeded(eager), *case)
    assert_matches(ref, got, rtol=1e-10, atol=1e-12)
    conv.dropout = 0.0
    assert not torch.allclose(eager(*case), got[0])  # dropout did change the output


def test_dropout_keeps_the_expectation_and_eval_ignores_it():
    """One sample repeated 4,000 times: every copy draws its own mask; the mean of the
    outputs is the dropout-free output (the layer is linear in alpha). Eval mode drops nothing."""
    conv, x_src, mask, x_dst, edge_attr = make_case(1, 6, 2, 2, seed=6, dropout=0.5)
    reps = 4000
    rep = lambda x: x.expand(reps, *x.shape[1:])  # noqa: E731
    conv.eval()
    clean = eager(conv, x_src, mask, x_dst, edge_attr)
    clean_rep = eager(conv, rep(x_src), rep(mask), rep(x_dst), rep(edge_attr))
    torch.testing.assert_close(clean_rep, clean.expand_as(clean_rep), rtol=0, atol=1e-12)
    conv.train()
    torch.manual_seed(0)
    noisy = eager(conv, rep(x_src), rep(mask), rep(x_dst), rep(edge_attr))
    spread = (noisy - clean).abs().amax(0)
    assert (spread > 1e-3).all()  # every output entry was changed by some draw
    # Mean within 5 standard errors of the dropout-free output.
    err = noisy.mean(0) - clean[0]
    assert (err.abs() <= 5 * noisy.std(0) / reps ** 0.5 + 1e-9).all()
    conv.dropout = 0.0
    torch.testing.assert_close(eager(conv, x_src, mask, x_dst, edge_attr), clean, rtol=0, atol=1e-12)


def test_keeps_no_edge_sized_tensor_for_backward():
    """Saved for backward: x_l, x_r and (N, T, S, H)-sized tensors, never an (N, T, S, H, C) one."""
    n, s, t, heads, c = 4, 40, 2, 4, 32
    conv, x_src, mask, x_dst, edge_attr = make_case(n, s, t, heads, channels=c, ragged=False)
    x_src.requires_grad_(True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        eager(conv, x_src, mask, x_dst, edge_attr)
    per_edge = n * t * s * heads * c
    assert max(sizes) == n * s * heads * c  # x_l
    assert sum(sizes) < per_edge
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        pyg_reference(conv, x_src, mask, x_dst, edge_attr)
    assert max(sizes) >= per_edge  # the check can see per-edge tensors


def test_autocast_bfloat16_cpu():
    """Under autocast the projections run in bfloat16, the softmax in float32: as close to the
    float32 result as PyG under the same autocast (whose rounding errors are of the same kind)."""
    case = make_case(5, 30, 2, 4, channels=16, seed=8, dtype=torch.float32)
    ref = outputs_and_grads(eager, *case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads(eager, *case)
        pyg = outputs_and_grads(pyg_reference, *case)
    assert got[0].dtype == torch.float32  # the float32 bias promotes, as in PyG

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(got[0], ref[0]) <= 2 * rel(pyg[0], ref[0]) + 1e-3
    for name, g in ref[1].items():
        assert got[1][name].dtype == g.dtype, name
        assert rel(got[1][name], g) <= 2 * rel(pyg[1][name], g) + 1e-3, name


def test_argument_checks():
    conv, x_src, mask, x_dst, edge_attr = make_case(2, 5, 2, 1)
    with pytest.raises(ValueError, match="impl"):
        star_gatv2(conv, x_src, mask, x_dst, edge_attr, impl="fast")
    with pytest.raises(ValueError, match="edge_attr"):
        eager(conv, x_src, mask, x_dst, edge_attr[:, :1])
    with pytest.raises(ValueError, match="edge_dim 1"):
        eager(conv, x_src, mask, x_dst, None)
    with pytest.raises(ValueError, match="samples"):
        eager(conv, x_src, mask, x_dst[:1], edge_attr)
    with pytest.raises(ValueError):
        attention.set_default_impl("fast")


def compile_failing_with(monkeypatch, message: str) -> None:
    """torch.compile whose compiled function raises RuntimeError(message); a fresh compile cache."""
    def failing_compile(fn, **kw):
        def run(*args):
            raise RuntimeError(message)
        return run

    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    monkeypatch.setattr(torch, "compile", failing_compile)


def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch):
    compile_failing_with(monkeypatch, "no compiler here")
    case = make_case(3, 7, 2, 2, seed=9)
    ref = outputs_and_grads(eager, *case)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        got = outputs_and_grads(lambda *a: star_gatv2(*a, impl="auto"), *case)
    assert_matches(ref, got, rtol=0, atol=0)
    assert compiled._compiled.error is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then silently eager
        star_gatv2(*case, impl="auto")
    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    with pytest.raises(RuntimeError, match="no compiler here"):
        star_gatv2(*case, impl="compiled")


def test_auto_does_not_fall_back_on_out_of_memory(monkeypatch):
    compile_failing_with(monkeypatch, "DefaultCPUAllocator: can't allocate memory: you tried to allocate")
    with pytest.raises(RuntimeError, match="allocate memory"):
        star_gatv2(*make_case(2, 5, 2, 1), impl="auto")
    assert compiled._compiled.error is None


@pytest.mark.parametrize("n,s,t,heads", SHAPES)
def test_fused_expressions_match_pyg(monkeypatch, n, s, t, heads):
    """The whole-tensor expressions that impl="compiled" hands to torch.compile, run as plain
    PyTorch (torch.compile stubbed out): their math, without the compile time."""
    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    case = make_case(n, s, t, heads, seed=n + s)
    got = outputs_and_grads(lambda *a: star_gatv2(*a, impl="compiled"), *case)
    assert set(compiled._compiled._fns) == {f"attention.{name}" for name in (
        "scores", "messages", "grad_alpha", "grad_src", "grad_dst", "grad_edge")}
    assert_matches(outputs_and_grads(pyg_reference, *case), got, rtol=1e-10, atol=1e-12)


@pytest.fixture
def without_native(native_switch):
    """The torch.compile'd passes themselves: on CPU float32 the C++ loops would run instead
    (tests/test_fuse_native.py tests those)."""
    native_switch(False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_matches_pyg(dtype, without_native):
    """The torch.compile'd fused passes (dynamic shapes: one compile serves every case)."""
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for n, s, t, heads in SHAPES:
        case = make_case(n, s, t, heads, channels=16, seed=n + s, dtype=dtype)
        got = outputs_and_grads(lambda *a: star_gatv2(*a, impl="compiled"), *case)
        assert_matches(outputs_and_grads(pyg_reference, *case), got, **tol)


def rows_of(x_src, mask, seed=0):
    """The real sources of a padded case as stacked rows in a random order, and the Sources placing them."""
    n, s, _ = x_src.shape
    real = torch.nonzero(mask.reshape(-1)).squeeze(1)
    slot = real[torch.randperm(real.numel(), generator=torch.Generator().manual_seed(seed))]
    row = torch.zeros(n * s, dtype=torch.long)
    row[slot] = torch.arange(slot.numel())
    return slot, Sources(row.view(n, s), mask, slot)


def on_rows(impl):
    """star_gatv2_rows as a function of the padded inputs: the real rows gathered (differentiably) in a shuffled
    order, so the gradients land on x_src's slots and compare with PyG's directly."""
    def fn(conv, x_src, mask, x_dst, edge_attr):
        slot, sources = rows_of(x_src, mask)
        return star_gatv2_rows(conv, x_src.flatten(0, 1)[slot], sources, x_dst, edge_attr, impl=impl)
    return fn


@pytest.mark.parametrize("n,s,t,heads", SHAPES)
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_rows_in_any_order_match_pyg(monkeypatch, n, s, t, heads, impl):
    """Sources as stacked rows (the layout lin_l writes), placed in slots by an index: outputs and every
    gradient as PyG's, for the eager passes and the fused expressions (torch.compile stubbed out)."""
    if impl == "fused":
        monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    case = make_case(n, s, t, heads, seed=n + s)
    got = outputs_and_grads(on_rows("eager" if impl == "eager" else "compiled"), *case)
    assert_matches(outputs_and_grads(pyg_reference, *case), got, rtol=1e-10, atol=1e-12)


def test_rows_argument_checks():
    conv, x_src, mask, x_dst, edge_attr = make_case(2, 5, 2, 1)
    slot, sources = rows_of(x_src, mask)
    x_rows = x_src.flatten(0, 1)[slot]
    with pytest.raises(ValueError, match="place each of the"):
        star_gatv2_rows(conv, x_rows[1:], sources, x_dst, edge_attr, impl="eager")
    with pytest.raises(ValueError, match="x_rows"):
        star_gatv2_rows(conv, x_src, sources, x_dst, edge_attr, impl="eager")


@pytest.mark.slow
def test_compiled_rows_match_pyg_and_store_nothing_edge_sized(without_native):
    """The compiled passes on shuffled rows: PyG's outputs and gradients, and no allocation during forward and
    backward larger than x_l (a stored z, (N, T, S, H, C), would be T times larger)."""
    from torch.profiler import profile

    n, s, t, heads, c = 6, 40, 3, 4, 16
    case = make_case(n, s, t, heads, channels=c, seed=3, dtype=torch.float32, ragged=False)
    got = outputs_and_grads(on_rows("compiled"), *case)  # compiles
    assert_matches(outputs_and_grads(pyg_reference, *case), got, rtol=1e-5, atol=1e-5)
    with profile(profile_memory=True) as prof:
        outputs_and_grads(on_rows("compiled"), *case)
    # Every allocation, inside the compiled graphs too (operator totals are net of frees: they would miss a
    # z allocated and freed within one pass).
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert max(sizes) == n * s * heads * c * 4  # x_l and its gradient, nothing larger


def test_rows_fall_back_to_eager_inside_a_call(monkeypatch):
    """Compiling fails during a call on rows: that call's eager passes gather x_l into the padded layout and
    still give PyG's outputs and gradients; later calls pad the inputs instead."""
    compile_failing_with(monkeypatch, "no compiler here")
    case = make_case(5, 9, 2, 2, seed=4)
    ref = outputs_and_grads(pyg_reference, *case)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        got = outputs_and_grads(on_rows("auto"), *case)
    assert_matches(ref, got, rtol=1e-10, atol=1e-12)
    assert_matches(ref, outputs_and_grads(on_rows("auto"), *case), rtol=1e-10, atol=1e-12)


def test_rows_out_of_range_are_refused():
    """The compiled passes read through the indices unchecked: out-of-range ones are refused up front."""
    conv, x_src, mask, x_dst, edge_attr = make_case(2, 5, 2, 1, ragged=False)
    slot, sources = rows_of(x_src, mask)
    x_rows = x_src.flatten(0, 1)[slot]
    bad_row = sources._replace(row=sources.row.clone().fill_(x_rows.size(0)))
    bad_slot = sources._replace(slot=sources.slot - 1)
    for bad in (bad_row, bad_slot):
        with pytest.raises(RuntimeError, match="out of range"):
            star_gatv2_rows(conv, x_rows, bad, x_dst, edge_attr, impl="compiled")
