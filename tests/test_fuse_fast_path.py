"""The dense attention path (fuse.attention.star_gatv2 inside the encoder) computes the model of PyG's
GATv2Conv.forward path: outputs and every parameter's gradient on HADA-shaped batches, and the same training
run on the demo."""
import json

import pytest
import torch

from conftest import TINY_FUSE, run_cli
from fuse import compiled
from fuse.batch import PackedFeatures
from fuse.config import ModelConfig
from fuse.model import GraphEncoder, HadaModel

pytestmark = pytest.mark.usefixtures("one_thread")


def hada_batch(n, tokens, widths, embeds, seed):
    """One side's NodeBlocks: backbone b has ``tokens[b]`` rows per sample (a tuple: ragged, cycled)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for rows, w, e in zip(tokens, widths, embeds):
        counts = [rows[i % len(rows)] for i in range(n)]
        samples = [torch.randn(c, w, generator=g) for c in counts]
        blocks.append(PackedFeatures.from_samples(samples, torch.randn(n, e, generator=g)).gather(torch.arange(n)))
    return blocks


def grads(encoder, blocks):
    encoder.zero_grad()
    out = encoder(blocks)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in encoder.named_parameters()}


CASES = [  # (batch, rows per backbone, node widths, embed dims, reference bug)
    (1, [(5,), (1,)], [12, 12], [6, 9], False),
    (4, [(17,), (1,)], [12, 12], [6, 9], False),  # images: BLIP tokens + one CLIP node
    (6, [(3, 9, 1, 6), (1,)], [12, 12], [6, 9], False),  # captions: ragged
    (5, [(7, 2), (4, 1, 3), (1,)], [12, 10, 8], [6, 9, 5], False),  # three backbones, tokens in two
    (4, [(6, 3), (1,)], [12, 12], [6, 9], True),
    (9, [(17,), (1,)], [12, 12], [6, 9], True),
]


# dense: the eager passes here (conftest); dense-compiled: on CPU float32, the C++ loops
DENSE = ["dense", "dense-compiled"]


@pytest.mark.parametrize("attention", DENSE)
@pytest.mark.parametrize("n,tokens,widths,embeds,bug", CASES)
def test_dense_encoder_equals_pyg_outputs_and_gradients(n, tokens, widths, embeds, bug, attention, native_calls):
    cfg = ModelConfig(width=8, heads=3, embed_dim=10, dropout=0.0, reference_bug=bug)
    torch.manual_seed(0)
    pyg = GraphEncoder(widths, embeds, cfg, attention="pyg").train()
    dense = GraphEncoder(widths, embeds, cfg, attention=attention).train()
    dense.load_state_dict(pyg.state_dict())
    blocks = hada_batch(n, tokens, widths, embeds, seed=n)
    want, want_grads = grads(pyg, blocks)
    got, got_grads = grads(dense, blocks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert want_grads["conv.att"].abs().sum() > 0 and want_grads["conv.lin_edge.weight"].abs().sum() > 0
    assert native_calls == ({"forward": 1, "backward": 1} if attention == "dense-compiled"
                            else {"forward": 0, "backward": 0})


@pytest.mark.parametrize("attention", DENSE)
def test_dense_model_losses_equal_pyg(attention, native_calls, monkeypatch):
    """Whole model, both sides, momentum encoders, queue and ITM: the same losses and gradients."""
    monkeypatch.setattr(compiled, "_compiled", compiled.Compiled())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the ITC loss's expressions, uncompiled
    cfg = ModelConfig(width=8, heads=2, embed_dim=10, dropout=0.0, queue_size=16)
    dims = ([12, 12], [6, 9], [12, 12], [6, 9])
    images, texts = hada_batch(6, [(5,), (1,)], dims[0], dims[1], 1), hada_batch(6, [(3, 7), (1,)], *dims[2:], 2)
    out = {}
    for kind in ("pyg", attention):
        torch.manual_seed(0)
        model = HadaModel(*dims, cfg, attention=kind)
        torch.manual_seed(1)
        losses = model(images, texts, torch.tensor([0, 0, 1, 2, 3, 4]))
        losses["loss"].backward()
        out[kind] = ({k: v.detach() for k, v in losses.items()},
                     {k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    for k in out["pyg"][0]:
        torch.testing.assert_close(out[attention][0][k], out["pyg"][0][k], rtol=1e-5, atol=1e-6)
    for k in out["pyg"][1]:
        torch.testing.assert_close(out[attention][1][k], out["pyg"][1][k], rtol=1e-4, atol=1e-6, msg=k)
    if attention == "dense-compiled":  # both encoders, online and momentum, forward; the online ones backward
        assert native_calls == {"forward": 4, "backward": 2}


@pytest.mark.parametrize("dense", ["dense", pytest.param("dense-compiled", marks=pytest.mark.slow)])
def test_fast_and_pyg_paths_train_the_same_run_on_the_demo(demo_cache, tmp_path, dense, native_calls):
    """Same seed, dropout 0 (the two paths draw their dropout masks differently): the same losses and recall.
    dense-compiled: through the C++ attention loops on CPU, and the torch.compile'd ITC loss (slow: compiles)."""
    _, cache = demo_cache
    rows = {}
    for attention in ("pyg", dense):
        run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,clip-tiny", "--cache", cache, "--runs",
                tmp_path, *TINY_FUSE, "--dropout", 0, "--epochs", 2, "--run", attention, "--attention", attention)
        lines = (tmp_path / attention / "metrics.jsonl").read_text().splitlines()
        rows[attention] = [json.loads(line) for line in lines]
    for a, b in zip(rows["pyg"], rows[dense]):
        for key in ("loss", "loss_itc", "loss_itm", "rsum"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
    assert (native_calls["backward"] > 0) == (dense == "dense-compiled")
