"""The star attention's C++ loops (fuse/native.py, fuse/star_attention.cpp) against PyG's GATv2Conv.

They run where the compiled attention meets CPU float32 with a constant edge attribute (HADA's case): the
forward, and the backward unless the edge attribute needs a gradient.
"""
import pytest
import torch
from test_fuse_attention import assert_matches, make_case, on_rows, outputs_and_grads, pyg_reference

from fuse import compiled, native
from fuse.attention import star_gatv2

CASES = [  # (samples, max sources, targets, heads, channels): T from 1 to 4, channel tails off the vector width
    (1, 2, 1, 1, 5), (3, 17, 2, 4, 16), (17, 60, 2, 4, 37), (5, 9, 3, 1, 8), (4, 30, 4, 2, 24),
]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def calls(native_calls, native_switch):
    """native_calls (conftest); the library must build here."""
    native_switch(True)
    assert native._library() is not None, native.error
    return native_calls


def constant_edges(fn):
    """fn with the edge attribute detached: no gradient asked for it (HADA's edges are fixed)."""
    return lambda conv, x_src, mask, x_dst, edge_attr: fn(conv, x_src, mask, x_dst, edge_attr.detach())


def compiled_padded(conv, *args):
    return star_gatv2(conv, *args, impl="compiled")


def without_edge_grad(grads):
    return {k: v for k, v in grads.items() if k != "edge_attr"}


@pytest.mark.parametrize("n,s,t,heads,c", CASES)
@pytest.mark.parametrize("layout", ["padded", "rows"])
def test_native_matches_pyg(calls, n, s, t, heads, c, layout):
    """Outputs and every gradient (inputs and parameters) as PyG's, padded sources and shuffled rows, ragged."""
    case = make_case(n, s, t, heads, channels=c, seed=n + s + t, dtype=torch.float32)
    fn = compiled_padded if layout == "padded" else on_rows("compiled")
    out, grads = outputs_and_grads(constant_edges(fn), *case)
    ref_out, ref_grads = outputs_and_grads(constant_edges(pyg_reference), *case)
    assert_matches((ref_out, without_edge_grad(ref_grads)), (out, without_edge_grad(grads)), **TOL)
    assert calls == {"forward": 1, "backward": 1}


def test_padding_rows_get_zero_gradient(calls):
    conv, x_src, mask, x_dst, edge_attr = make_case(6, 12, 2, 2, channels=8, seed=4, dtype=torch.float32)
    x_src = x_src.masked_fill(~mask.unsqueeze(-1), 3.0).requires_grad_(True)  # finite padding, not zeros
    star_gatv2(conv, x_src, mask, x_dst, edge_attr, impl="compiled").sum().backward()
    assert (~mask).any() and (x_src.grad[~mask] == 0).all()
    assert (x_src.grad[mask] != 0).any()


def test_dropout_draws_as_pyg(calls):
    """Train mode, p = 0.4: the same mask as F.dropout for the same random state, so PyG's numbers."""
    case = make_case(3, 8, 2, 2, channels=8, seed=5, ragged=False, dropout=0.4, dtype=torch.float32)
    case[0].train()

    def seeded(fn):
        def run(*args):
            torch.manual_seed(123)
            return fn(*args)
        return run

    out, grads = outputs_and_grads(seeded(constant_edges(compiled_padded)), *case)
    ref_out, ref_grads = outputs_and_grads(seeded(constant_edges(pyg_reference)), *case)
    assert_matches((ref_out, without_edge_grad(ref_grads)), (out, without_edge_grad(grads)), **TOL)
    case[0].dropout = 0.0
    assert not torch.allclose(compiled_padded(*case), out)  # dropout did change the output


def test_without_edge_features(calls):
    case = make_case(4, 10, 2, 2, channels=8, seed=9, dtype=torch.float32, edge_dim=None)
    conv, x_src, mask, x_dst, _ = case
    fn = lambda *a: star_gatv2(*a[:4], None, impl="compiled")  # noqa: E731
    ref = outputs_and_grads(lambda *a: pyg_reference(*a[:4], None), conv, x_src, mask, x_dst, None)
    assert_matches(ref, outputs_and_grads(fn, conv, x_src, mask, x_dst, None), **TOL)
    assert calls == {"forward": 1, "backward": 1}


def test_edge_gradient_uses_the_compiled_backward(calls, monkeypatch):
    """Asked for d edge_attr, the backward runs the compiled passes (here as plain PyTorch) after the native
    forward: PyG's numbers, the edge gradient included."""
    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    case = make_case(3, 17, 2, 4, channels=16, seed=2, dtype=torch.float32)
    assert_matches(outputs_and_grads(pyg_reference, *case), outputs_and_grads(compiled_padded, *case), **TOL)
    assert calls == {"forward": 1, "backward": 0}


def test_where_it_applies(native_switch):
    native_switch(True)
    x = torch.zeros(4, 2, 3)
    assert native.applies(x, torch.zeros(2, 2, 2, 3), torch.float32)
    assert not native.applies(x.double(), torch.zeros(2, 2, 2, 3).double(), torch.float64)
    assert not native.applies(x.bfloat16(), torch.zeros(2, 2, 2, 3), torch.float32)
    assert not native.applies(x, torch.zeros(2, 5, 2, 3), torch.float32)  # 5 targets: not compiled
    native_switch(False)
    assert not native.applies(x, torch.zeros(2, 2, 2, 3), torch.float32)


def test_build_is_cached_by_source_flags_and_compiler(tmp_path):
    first = native.build(tmp_path)
    assert first.is_file() and first.parent == tmp_path
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(FileNotFoundError, match="no-such-c\\+\\+"):
        native.build(tmp_path)


def test_failed_build_falls_back_to_the_compiled_passes(monkeypatch, tmp_path):
    """No library (a broken compiler): one warning naming why, then the compiled passes, PyG's numbers."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "error", None)
    monkeypatch.setenv("FUSE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # exists, fails
    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    case = make_case(3, 7, 2, 2, channels=8, seed=1, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ attention loops are not available"):
        got = outputs_and_grads(constant_edges(compiled_padded), *case)
    ref = outputs_and_grads(constant_edges(pyg_reference), *case)
    assert_matches((ref[0], without_edge_grad(ref[1])), (got[0], without_edge_grad(got[1])), **TOL)
    assert isinstance(native.error, RuntimeError) and "failed" in str(native.error)
    assert list(tmp_path.iterdir()) == []  # the failed build's temporary is gone


def test_keeps_no_edge_sized_tensor_for_backward(calls):
    """Saved for backward: x_l, x_r and (N, T, S, H)-sized tensors (and the (N, T, H, C) messages), never an
    (N, T, S, H, C) one."""
    n, s, t, heads, c = 4, 40, 2, 4, 32
    conv, x_src, mask, x_dst, edge_attr = make_case(n, s, t, heads, channels=c, ragged=False, dtype=torch.float32)
    x_src.requires_grad_(True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        compiled_padded(conv, x_src, mask, x_dst, edge_attr)
    assert calls["forward"] == 1
    assert max(sizes) == n * s * heads * c  # x_l
    assert sum(sizes) < n * t * s * heads * c


def test_the_logs_name_the_implementation(native_switch):
    from fuse.attention import implementation

    cpu = torch.device("cpu")
    native_switch(True)
    assert implementation("compiled", cpu, torch.float32).startswith("C++ loops")
    assert implementation("compiled", cpu, torch.bfloat16) == "torch.compile'd passes"
    assert implementation("eager", cpu, torch.float32) == "eager PyTorch passes"
    native_switch(False)
    assert implementation("auto", cpu, torch.float32) in ("torch.compile'd passes", "eager PyTorch passes")
    assert implementation("compiled", cpu, torch.float32) == "torch.compile'd passes"
