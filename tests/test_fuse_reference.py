"""The fusion model equals HADA-LAVIS's, computed by an oracle restated from the reference's equations
(tests/hada_reference.py): same weights, same fused embeddings, with and without the reference's bug; and the
reference's recipe: schedule, queue, second stage, checkpoint import."""
import math

import numpy as np
import pytest
import torch

import hada_reference as ref
from fuse.batch import NodeBlock
from fuse.config import ModelConfig
from fuse.hada_import import reference_state_to_model
from fuse.model import GraphEncoder, HadaModel

pytestmark = pytest.mark.usefixtures("one_thread")

D, E1, E2, WIDTH, HEADS, EMBED = 12, 6, 9, 8, 2, 10


def batch(n, tokens, seed):
    """Backbone 1 with ``tokens`` rows per sample (ragged when a tuple), backbone 2 one global node."""
    g = torch.Generator().manual_seed(seed)
    n1 = torch.tensor([tokens[i % len(tokens)] for i in range(n)])
    n2 = torch.ones(n, dtype=torch.long)
    x1 = torch.randn(int(n1.sum()), D, generator=g)
    x2 = torch.randn(n, D, generator=g)
    e1, e2 = torch.randn(n, E1, generator=g), torch.randn(n, E2, generator=g)
    return x1, x2, n1, n2, e1, e2


def oracle_and_encoder(dropout=0.0, bug=False, seed=0):
    torch.manual_seed(seed)
    oracle = ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED, dropout)
    for p in oracle.parameters():  # larger than the default init, so every term matters
        torch.nn.init.normal_(p, std=0.5)
    encoder = GraphEncoder([D, D], [E1, E2], ModelConfig(width=WIDTH, heads=HEADS, embed_dim=EMBED, dropout=dropout,
                                                         reference_bug=bug))
    state = {"img_encoder": oracle.state_dict(), "cap_encoder": oracle.state_dict(),
             "discriminator": ref.Discriminator(EMBED).state_dict(), "temp_para": torch.tensor(0.07)}
    weights = reference_state_to_model(state)
    encoder.load_state_dict({k[len("image_encoder."):]: v for k, v in weights.items()
                             if k.startswith("image_encoder.")})
    return oracle, encoder


@pytest.mark.parametrize("bug", [False, True])
@pytest.mark.parametrize("n,tokens", [(1, (5,)), (4, (17,)), (7, (3, 9, 1, 6))])
def test_encoder_equals_the_reference_oracle(n, tokens, bug):
    """Train mode, dropout 0: fused embeddings equal to 1e-5, image-like (equal counts) and caption-like
    (ragged) samples."""
    oracle, encoder = oracle_and_encoder(bug=bug)
    oracle.train(), encoder.train()
    x1, x2, n1, n2, e1, e2 = batch(n, tokens, seed=n)
    want = oracle(x1, x2, n1, n2, e1, e2, bug=bug)
    got = encoder([NodeBlock(x1, n1, e1), NodeBlock(x2, n2, e2)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The bug changes the output whenever the batch has more than one sample's rows to mix up.
    if n > 1:
        other = oracle(x1, x2, n1, n2, e1, e2, bug=not bug)
        assert (other - want).abs().max() > 1e-3


def test_self_loops_follow_pyg_mean_fill():
    """The explicit-weight deviation differs from the reference: the self-loop handling is really tested."""
    oracle, encoder = oracle_and_encoder()
    x1, x2, n1, n2, e1, e2 = batch(3, (6,), seed=1)
    want = oracle.eval()(x1, x2, n1, n2, e1, e2)
    explicit = GraphEncoder([D, D], [E1, E2], ModelConfig(width=WIDTH, heads=HEADS, embed_dim=EMBED,
                                                          self_loop_weight=1.0))
    explicit.load_state_dict(encoder.state_dict())
    got = explicit.eval()([NodeBlock(x1, n1, e1), NodeBlock(x2, n2, e2)])
    assert (got - want).abs().max() > 1e-4


def test_eval_mode_ignores_dropout_and_train_mode_uses_it():
    oracle, encoder = oracle_and_encoder(dropout=0.4)
    x1, x2, n1, n2, e1, e2 = batch(4, (8,), seed=2)
    blocks = [NodeBlock(x1, n1, e1), NodeBlock(x2, n2, e2)]
    torch.testing.assert_close(encoder.eval()(blocks), oracle.eval()(x1, x2, n1, n2, e1, e2), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    a = encoder.train()(blocks)
    b = encoder(blocks)
    assert (a - b).abs().max() > 1e-3


def test_reference_bug_needs_two_equal_width_backbones():
    with pytest.raises(ValueError, match="reference-bug"):
        GraphEncoder([D, D + 1], [E1, E2], ModelConfig(width=WIDTH, heads=HEADS, reference_bug=True))
    with pytest.raises(ValueError, match="reference-bug"):
        GraphEncoder([D, D, D], [E1, E2, E1], ModelConfig(width=WIDTH, heads=HEADS, reference_bug=True))


def test_parameter_count_and_init_as_the_reference():
    enc = GraphEncoder([768, 768], [256, 768])
    assert sum(p.numel() for p in enc.parameters()) == 4_993_024
    # kaiming-normal (fan_in, gain sqrt 2) on the reference's SeqLinear layers
    for lin, fan_in in ((enc.proj[0].linear, 768), (enc.merge.linear, 2048), (enc.out.linear, 2048)):
        assert abs(lin.weight.std().item() - math.sqrt(2 / fan_in)) < 0.1 * math.sqrt(2 / fan_in)
    model = HadaModel([768, 768], [256, 768], [768, 768], [256, 768])
    assert model.itm_head.drop.p == 0.4 and model.itm_head.linear.weight.shape == (1, 2048)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 4_993_024 + 2049 + 1  # encoders, ITM head, temperature (w trains in stage two)


def test_queue_starts_with_random_unit_vectors_that_take_part():
    model = HadaModel([D, D], [E1, E2], [D, D], [E1, E2],
                      ModelConfig(width=WIDTH, heads=HEADS, embed_dim=EMBED, queue_size=40))
    assert model.cfg.queue_size == 40 and ModelConfig().queue_size == 64000
    np.testing.assert_allclose(model.image_queue.norm(dim=0).numpy(), 1, atol=1e-5)
    np.testing.assert_allclose(model.text_first_queue.norm(dim=0).numpy(), 1, atol=1e-5)
    assert (model.idx_queue == -100).all()
    # The random entries are in the softmax: the loss changes with them.
    x1, x2, n1, n2, e1, e2 = batch(3, (5,), seed=3)
    blocks = [NodeBlock(x1, n1, e1), NodeBlock(x2, n2, e2)]
    model.eval()
    a = model(blocks, blocks, torch.arange(3))["loss_itc"]
    with torch.no_grad():
        model.image_queue.copy_(torch.nn.functional.normalize(torch.randn_like(model.image_queue), dim=0))
    b = model(blocks, blocks, torch.arange(3))["loss_itc"]
    assert abs(float(a.detach()) - float(b.detach())) > 1e-4


def reference_lrs(base, t0, t_mult, eta_min, iters, epochs):
    """The lr each iteration runs with in HADA-LAVIS: CosineAnnealingWarmRestarts stepped after iteration i of
    epoch e with step(e + i / iters), i.e. iteration g runs with the lr at T = max(g - 1, 0) / iters."""
    out = []
    for g in range(iters * epochs):
        t = max(g - 1, 0) / iters
        period, start = t0, 0.0
        while t >= start + period:
            start, period = start + period, period * t_mult
        out.append(eta_min + (base - eta_min) * (1 + math.cos(math.pi * (t - start) / period)) / 2)
    return out


def test_learning_rate_sequence_equals_the_reference(monkeypatch):
    """Run the real training loop's schedule for 5 epochs of 4 iterations with T0=2: restarts included."""
    from fuse import train as train_module
    from fuse.config import FuseConfig

    seen = []
    model = torch.nn.Linear(2, 1)
    trainer = train_module.Trainer.__new__(train_module.Trainer)
    trainer.cfg = FuseConfig(lr=1e-3, t0=2, t_mult=2, eta_min=1e-5)
    trainer.model, trainer.device = model, torch.device("cpu")
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(trainer.optimizer, T_0=2, T_mult=2,
                                                                            eta_min=1e-5)

    def step(features, batch, id_start):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return {"loss": torch.tensor(0.0), "loss_itc": torch.tensor(0.0), "loss_itm": torch.tensor(0.0)}

    monkeypatch.setattr(trainer, "step", step)
    monkeypatch.setattr(trainer.model, "train", lambda *a: None)
    plan = [train_module.Batch(0, torch.arange(2), torch.arange(2), torch.zeros(2, dtype=torch.long))] * 4
    for epoch in range(1, 6):
        train_module.run_epoch(trainer, epoch, plan, [(0, 1)], object(), None, None, torch.device("cpu"))
    np.testing.assert_allclose(seen, reference_lrs(1e-3, 2, 2, 1e-5, 4, 5), rtol=1e-9)
    assert min(seen) < 1e-4 and seen.count(1e-3) >= 2  # it reached the bottom and restarted
