"""fuse.model: losses, gradients, momentum, queues, temperature, weighting, determinism, training."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fuse.model
from evaluate.weighted import mix_embeddings, mix_scores
from fuse.batch import PackedFeatures
from fuse.config import ModelConfig
from fuse.losses import id_targets, sample_hard_negatives
from fuse.model import GraphEncoder, HadaModel
from tests.itc_oracle import plain_itc_against_queues

TOK, EMB = [12, 10], [8, 6]
CFG = ModelConfig(width=16, heads=2, embed_dim=8, queue_size=10, dropout=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(n, seed=0, tokens=(4, 1)):
    """A random batch for one side; sample rows per backbone drawn from 1..tokens[b]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, (w, d) in enumerate(zip(TOK, EMB)):
        counts = torch.randint(1, tokens[b] + 1, (n,), generator=g)
        samples = [torch.randn(int(c), w, generator=g) for c in counts]
        out.append(PackedFeatures.from_samples(samples, torch.randn(n, d, generator=g))
                   .gather(torch.arange(n)))
    return out


def model(**kw):
    return HadaModel(TOK, EMB, TOK, EMB, dataclasses.replace(CFG, **kw))


def test_parameter_count_hada_dims():
    enc = GraphEncoder([768, 768], [256, 768])
    n = sum(p.numel() for p in enc.parameters())
    w, h = 512, 4
    derived = (2 * (768 * w + w)  # per-backbone projections
               + 2 * (w * h * w + h * w)  # GATv2 lin_l, lin_r
               + h * w + h * w + h * w  # GATv2 att, lin_edge, bias
               + (h * w * w + w)  # head merge
               + (2 * w + 256 + 768) * 512 + 512)  # output layer
    assert n == derived == 4_993_024


@pytest.mark.parametrize("weighted", [False, True])
def test_forward_backward_gradients(weighted):
    torch.manual_seed(0)
    m = model(weighted=weighted)
    out = m(blocks(6, 1), blocks(6, 2), torch.tensor([0, 0, 1, 2, 3, 3]))
    assert set(out) == {"loss", "loss_itc", "loss_itm"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for name, p in m.named_parameters():
        if name.endswith("_m") or "_m." in name:
            assert not p.requires_grad and p.grad is None, name
        elif name == "w":
            assert p.requires_grad == weighted
            assert (p.grad is not None) == weighted
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.w.grad is None or m.w.grad.abs() > 0


def test_momentum_update():
    m = model()
    online = [*m.image_encoder.parameters(), *m.text_encoder.parameters()]
    mom = [*m.image_encoder_m.parameters(), *m.text_encoder_m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(online, mom))  # copies at init
    with torch.no_grad():
        for p in online:
            p.add_(1.0)
    before = [p.clone() for p in mom]
    m.momentum_update()
    for p, pm, old in zip(online, mom, before):
        torch.testing.assert_close(pm, 0.995 * old + 0.005 * p)
        assert (p - pm).abs().sum() < (p - old).abs().sum()


def test_itc_targets_several_captions_and_queue():
    ids = torch.tensor([3, 3, 5, 7])
    t = id_targets(ids, torch.cat([ids, torch.tensor([3, -100, 5, 3, 9, -100])]))
    # columns: batch (3, 3, 5, 7), then queue (3, initial, 5, 3, 9, initial)
    expected = torch.tensor([
        [1, 1, 0, 0, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 1, 0, 0],
        [0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)
    torch.testing.assert_close(t, expected / expected.sum(1, keepdim=True))
    assert torch.equal(id_targets(torch.tensor([1]), torch.tensor([1, -100, 1])),
                       torch.tensor([[0.5, 0.0, 0.5]]))


def test_queue_wraps_around():
    torch.manual_seed(0)
    m = model(queue_size=5, dropout=0.0)
    ib, tb = blocks(3, 1), blocks(3, 2)
    m(ib, tb, torch.tensor([10, 11, 12]))
    assert m.queue_ptr.item() == 3 and m.idx_queue.tolist() == [10, 11, 12, -100, -100]
    m(ib, tb, torch.tensor([20, 21, 22]))
    assert m.queue_ptr.item() == 1 and m.idx_queue.tolist() == [22, 11, 12, 20, 21]
    # The queued features are this step's momentum features (dropout 0: recomputable).
    with torch.no_grad():
        img_m, txt_m = m.image_encoder_m(ib), m.text_encoder_m(tb)
    torch.testing.assert_close(m.image_queue[:, [3, 4, 0]], img_m.t())
    torch.testing.assert_close(m.text_queue[:, [3, 4, 0]], txt_m.t())
    torch.testing.assert_close(m.image_first_queue[:, [3, 4, 0]], F.normalize(ib[0].embeds).t())
    # A batch larger than the queue keeps its last queue_size entries.
    m(blocks(7, 3), blocks(7, 4), torch.arange(30, 37))
    assert m.queue_ptr.item() == (1 + 7) % 5
    assert m.idx_queue.tolist() == [34, 35, 36, 32, 33]  # slots 3, 4, 0, 1, 2 got 32..36


def test_eval_forward_changes_no_state():
    m = model().eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(blocks(4, 1), blocks(4, 2), torch.tensor([0, 1, 2, 3]))
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_temperature_and_weight_clamp():
    m = model(weighted=True)
    ib, tb, ids = blocks(4, 1), blocks(4, 2), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        m.temp.fill_(10.0)
        m.w.fill_(-3.0)
    m(ib, tb, ids)
    assert m.temp.item() == pytest.approx(0.5) and m.w.item() == pytest.approx(0.1)
    with torch.no_grad():
        m.temp.fill_(1e-6)
        m.w.fill_(3.0)
    out = m(ib, tb, ids)
    assert m.temp.item() == pytest.approx(0.001) and m.w.item() == pytest.approx(0.9)
    assert torch.isfinite(out["loss"])


def test_weighted_score_one_formula_for_training_and_embeddings():
    """mix_embeddings' dot products are mix_scores of the cosines (the encoded weighted stage scores as trained)."""
    m = model(weighted=True).eval()
    ib, tb = blocks(5, 1), blocks(3, 2)
    with torch.no_grad():
        m.w.fill_(2.0)  # clamped to weight_max
        w = float(m.mixing_weight())
        img, txt = m.encode_images(ib), m.encode_texts(tb)
    assert w == pytest.approx(0.9)
    first = F.normalize(ib[0].embeds, dim=-1) @ F.normalize(tb[0].embeds, dim=-1).t()
    want = mix_scores(img @ txt.t(), first, w)
    torch.testing.assert_close(want, 0.1 * (img @ txt.t()) + 0.9 * first)
    a, b = mix_embeddings(img, ib[0].embeds, w), mix_embeddings(txt, tb[0].embeds, w)
    torch.testing.assert_close(a @ b.t(), want)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5))


def test_hard_negatives():
    torch.manual_seed(0)
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    # Very low temperature: logits far apart; a mask-after-softmax would underflow.
    logits = torch.tensor([[1000.0, 999.0, -1000.0, -900.0]]).repeat(4, 1)
    idx, has = sample_hard_negatives(logits, same)
    assert has.all() and not same[torch.arange(4), idx].any()
    # Every entry masked (one image in the whole batch): no negative, no error.
    idx, has = sample_hard_negatives(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert not has.any() and idx.shape == (3,)


def test_itm_single_image_batch_falls_back():
    torch.manual_seed(0)
    m = model(dropout=0.0)
    out = m(blocks(4, 1), blocks(4, 2), torch.tensor([5, 5, 5, 5]))
    assert torch.isfinite(out["loss_itm"])
    # Only the positives count: the loss is BCE of the positive logits against 1.
    torch.manual_seed(0)
    m2 = model(dropout=0.0)
    m2.load_state_dict(m.state_dict())
    m2.eval()
    with torch.no_grad():
        img, txt = m2.encode_images(blocks(4, 1)), m2.encode_texts(blocks(4, 2))
        out = m2(blocks(4, 1), blocks(4, 2), torch.tensor([5, 5, 5, 5]))
        pos = m2.itm_head(torch.cat([img, txt, (img - txt).abs(), img * txt], 1))
    torch.testing.assert_close(out["loss_itm"], F.binary_cross_entropy_with_logits(
        pos.view(-1), torch.ones(4)))


def test_autocast_bfloat16_cpu():
    torch.manual_seed(0)
    m = model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(blocks(4, 1), blocks(4, 2), torch.tensor([0, 1, 1, 2]))
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss"].dtype == torch.float32 and m.image_queue.dtype == torch.float32


def run_steps(seed, steps=3):
    torch.manual_seed(seed)
    m = model()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for s in range(steps):
        out = m(blocks(6, s), blocks(6, 100 + s), torch.tensor([0, 0, 1, 2, 3, 4]) + s)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].detach())
    return torch.stack(losses), m.state_dict()


def test_reproducible_with_seed():
    l1, s1 = run_steps(123)
    l2, s2 = run_steps(123)
    assert torch.equal(l1, l2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    l3, _ = run_steps(124)
    assert not torch.equal(l1, l3)


def test_training_lowers_loss():
    """Token features encode an image's class; 100 steps must learn to match."""
    torch.manual_seed(0)
    n_img, caps = 16, 3
    proto = {side: [torch.randn(n_img, w) for w in TOK] for side in ("img", "txt")}
    proj = {side: [torch.randn(n_img, d) for d in EMB] for side in ("img", "txt")}

    def packed(side, ids):
        out = []
        for b in range(2):
            n_tok = 3 if b == 0 else 0
            samples = [proto[side][b][i] + 0.3 * torch.randn(1 + n_tok, TOK[b]) for i in ids]
            out.append(PackedFeatures.from_samples(
                samples, proj[side][b][ids] + 0.3 * torch.randn(len(ids), EMB[b])))
        return out

    img_ids = torch.arange(n_img)
    txt_ids = img_ids.repeat_interleave(caps)
    images, texts = packed("img", img_ids), packed("txt", txt_ids)
    m = model(queue_size=32)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(100):
        pick = torch.randperm(len(txt_ids))[:12]
        ids = txt_ids[pick]
        out = m([f.gather(ids) for f in images], [f.gather(pick) for f in texts], ids)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("backbone", [0, 1])
def test_every_backbones_token_nodes_reach_the_output(backbone):
    """The reference fed the first backbone's features twice; here each backbone's own tokens matter."""
    torch.manual_seed(0)
    enc = GraphEncoder(TOK, EMB, dataclasses.replace(CFG, dropout=0.0)).eval()
    batch = blocks(3, tokens=(4, 4))
    before = enc(batch)
    first = torch.cat([torch.zeros(1, dtype=torch.long), batch[backbone].counts.cumsum(0)[:-1]])
    token_rows = torch.ones(len(batch[backbone].tokens), dtype=torch.bool)
    token_rows[first] = False  # leave every global node as it is; change only token nodes
    changed = [dataclasses.replace(b) for b in batch]
    changed[backbone] = dataclasses.replace(batch[backbone], tokens=batch[backbone].tokens.clone())
    changed[backbone].tokens[token_rows] += 1.0
    after = enc(changed)
    has_tokens = batch[backbone].counts > 1
    assert has_tokens.any()
    assert not torch.allclose(before[has_tokens], after[has_tokens])
    torch.testing.assert_close(before[~has_tokens], after[~has_tokens])


@pytest.mark.parametrize("weighted", [False, True])
def test_itc_compares_against_the_queue_before_this_steps_enqueue(monkeypatch, weighted):
    """The ITC loss reads the queues where they are (no copy) and gives its gradients from the queues as they
    were before this step's enqueue, however the queues change before the backward: every parameter's
    gradient (temperature and w included) equals the reference's plain autograd over copied keys."""
    torch.manual_seed(0)
    m = model(weighted=weighted).train()
    ids = torch.tensor([0, 1, 2, 3])
    m(blocks(4, 1), blocks(4, 2), ids)["loss"].backward()
    state = copy.deepcopy(m.state_dict())
    m.zero_grad()
    torch.manual_seed(1)
    out = m(blocks(4, 3), blocks(4, 4), ids)
    assert not torch.equal(m.text_queue, state["text_queue"])  # enqueued in the forward
    if not weighted:  # (a weighted forward clamps w in place, which the previous graph saved: as the reference)
        m(blocks(4, 5), blocks(4, 6), ids)  # and again, before the first one's backward
    out["loss_itc"].backward()
    got = {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}

    m.load_state_dict(state)  # the same step with the reference's plain autograd loss over copied keys
    m.zero_grad()
    torch.manual_seed(1)
    monkeypatch.setattr(fuse.model, "itc_loss_against_queues", plain_itc_against_queues)
    m(blocks(4, 3), blocks(4, 4), ids)["loss_itc"].backward()
    want = {name: p.grad for name, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and {"temp", "image_encoder.out.linear.weight",
                                          "text_encoder.out.linear.weight"} <= set(got)
    assert ("w" in got) == weighted
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
