"""The fusion model equals HADA-LAVIS's, computed by an oracle restated from the reference's equations
(tests/hada_reference.py): same weights, same fused embeddings, with and without the reference's bug; and the
reference's recipe: schedule, queue, second stage, checkpoint import."""
import math
import types

import hada_reference as ref
import numpy as np
import pytest
import torch

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

    def step(features, batch, *offsets):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return {"loss": torch.tensor(0.0), "loss_itc": torch.tensor(0.0), "loss_itm": torch.tensor(0.0)}

    monkeypatch.setattr(trainer, "step", step)
    monkeypatch.setattr(trainer.model, "train", lambda *a: None)
    plan = [train_module.Batch(0, torch.arange(2), torch.arange(2), torch.zeros(2, dtype=torch.long))] * 4
    for epoch in range(1, 6):
        index = types.SimpleNamespace(caption_offsets=np.array([0, 2]))
        train_module.run_epoch(trainer, epoch, plan, [(0, 1)], object(), index, None, torch.device("cpu"))
    np.testing.assert_allclose(seen, reference_lrs(1e-3, 2, 2, 1e-5, 4, 5), rtol=1e-9)
    assert min(seen) < 1e-4 and seen.count(1e-3) >= 2  # it reached the bottom and restarted


def test_second_stage_loads_encoders_and_itm_head_only():
    """As HADA-LAVIS's load_model(weight_only=True): temperature, w and queues start afresh; the momentum
    encoders stay at the new model's random initialisation (unless --init-momentum)."""
    from fuse.config import FuseConfig
    from fuse.train import Trainer

    cfg = ModelConfig(width=WIDTH, heads=HEADS, embed_dim=EMBED, queue_size=8)
    dims = ([D, D], [E1, E2], [D, D], [E1, E2])
    torch.manual_seed(1)
    first = HadaModel(*dims, cfg)
    with torch.no_grad():
        first.temp.fill_(0.03)
        first.idx_queue.fill_(5)
        first.image_queue.zero_()
    stage_one = {"model": first.state_dict()}
    for momentum in (False, True):
        torch.manual_seed(2)
        second = HadaModel(*dims, ModelConfig(**{**cfg.to_dict(), "weighted": True}))
        fresh = {k: v.clone() for k, v in second.image_encoder.state_dict().items()}
        trainer = Trainer(FuseConfig(), second, torch.device("cpu"))
        trainer.init_from(stage_one, momentum)
        for k, v in first.image_encoder.state_dict().items():
            assert torch.equal(second.image_encoder.state_dict()[k], v)
        assert torch.equal(second.itm_head.linear.weight, first.itm_head.linear.weight)
        assert second.temp.item() == pytest.approx(0.07) and second.w.item() == pytest.approx(0.5)
        assert (second.idx_queue == -100).all() and second.image_queue.norm(dim=0).sub(1).abs().max() < 1e-5
        momentum_weights = second.image_encoder_m.state_dict()
        source = first.image_encoder.state_dict() if momentum else fresh
        assert all(torch.equal(momentum_weights[k], source[k]) for k in source)


def synthetic_cache(cache, dataset="syn", n_images=45, caps=5, seed=0, splits=("val", "test")):
    """Splits of two stored backbones with equal node widths (as BLIP and CLIP ViT-L, 768): backbone a with
    ragged token rows, backbone b one global node per sample."""
    from data.index import SplitIndex, store_index
    from data.store import FeatureStore, ShardData, write_shard

    rng = np.random.default_rng(seed)
    for split in splits:
        index = SplitIndex.from_samples(dataset, split, [(f"{split}_{i}.jpg", [f"c {i} {k}" for k in range(caps)])
                                                         for i in range(n_images)])
        store_index(index, cache)
        for name, embed, rows in (("a", E1, (5, 9)), ("b", E2, (1, 1))):
            store = FeatureStore.at(cache, dataset, split, name)
            manifest = store.claim({"backbone": name, "index_version": index.version})
            for kind, n in (("images", n_images), ("texts", n_images * caps)):
                counts = rng.integers(rows[0], rows[1] + 1, n)
                raw = rng.normal(size=(n, embed)).astype(np.float32)
                norms = np.linalg.norm(raw, axis=1)
                data = ShardData(ids=np.arange(n), embeds=raw / norms[:, None], norms=norms,
                                 offsets=np.concatenate([[0], np.cumsum(counts)]),
                                 tokens=rng.normal(size=(counts.sum(), D)).astype(np.float16))
                write_shard(store.root / f"{kind}-00000.h5", data, {"kind": kind})
            manifest.update(shards={"images": ["images-00000.h5"], "texts": ["texts-00000.h5"]}, bad_images=[])
            store.finish(manifest)
    return cache


def oracle_recall(img: ref.MH, cap: ref.MH, cache, bug: bool, w: float | None, batch: int = 20) -> dict:
    """The reference's evaluation: encode in split-index order, batches of 20, score (1 - w) fused + w BLIP."""
    from data.index import SplitIndex, index_path
    from data.store import FeatureStore
    from evaluate import retrieval_recall

    index = SplitIndex.load(index_path(cache, "syn", "test"))
    embs = {}
    for kind, model in (("images", img), ("texts", cap)):
        a, b = (FeatureStore.at(cache, "syn", "test", n).load(kind) for n in ("a", "b"))
        out, first = [], []
        for k in range(0, len(a), batch):
            rows = range(k, min(k + batch, len(a)))
            x1 = torch.cat([torch.from_numpy(a.tokens[a.offsets[r]:a.offsets[r + 1]]).float() for r in rows])
            x2 = torch.cat([torch.from_numpy(b.tokens[b.offsets[r]:b.offsets[r + 1]]).float() for r in rows])
            n1 = torch.tensor([a.offsets[r + 1] - a.offsets[r] for r in rows])
            e1 = torch.from_numpy(a.raw_embeds[list(rows)]).float()
            e2 = torch.from_numpy(b.raw_embeds[list(rows)]).float()
            out.append(model(x1, x2, n1, torch.ones(len(rows), dtype=torch.long), e1, e2, bug=bug))
            first.append(torch.nn.functional.normalize(e1, dim=1))
        embs[kind] = (torch.cat(out), torch.cat(first))
    (fi, bi), (ft, bt) = embs["images"], embs["texts"]
    sims = fi @ ft.T if w is None else (1 - w) * (fi @ ft.T) + w * (bi @ bt.T)
    return retrieval_recall(sims, index.text_to_image)


@pytest.mark.parametrize("bug,weighted", [(True, True), (False, False)])
def test_reference_checkpoint_round_trips_to_the_oracles_recall(tmp_path, bug, weighted):
    """A checkpoint in HADA-LAVIS's key layout -> `pipeline import-hada` -> `pipeline score`: the hada row is
    the oracle's recall, computed the reference's way from the same weights."""
    import json

    from conftest import run_cli

    cache, runs = synthetic_cache(tmp_path / "cache"), tmp_path / "runs"
    torch.manual_seed(3)
    img, cap = ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED), ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED)
    for p in [*img.parameters(), *cap.parameters()]:
        torch.nn.init.normal_(p, std=0.5)
    weight_1 = torch.nn.Parameter(torch.tensor(0.3)) if weighted else 0
    path = tmp_path / "best.pth.tar"
    torch.save(ref.reference_checkpoint(img, cap, ref.Discriminator(EMBED), 0.05, weight_1), path)
    flags = () if bug else ("--no-reference-bug",)
    run_cli("import-hada", path, "--dataset", "syn", "--backbones", "a,b", "--run", "imp", "--cache", cache,
            "--runs", runs, *flags)
    out = run_cli("score", "--dataset", "syn", "--run", "imp", "--cache", cache, "--runs", runs, "--json",
                  tmp_path / "s.json").output
    assert "hada (imp, best epoch 7) learned: temperature 0.05" + (", w 0.3" if weighted else "") in out
    doc = json.loads((tmp_path / "s.json").read_text())
    hada = next(r for r in doc["rows"] if r["method"] == "hada")
    with torch.no_grad():
        want = oracle_recall(img.eval(), cap.eval(), cache, bug, 0.3 if weighted else None)
    assert hada["rsum"] == pytest.approx(want["rsum"], abs=1e-6)
    assert {k: round(v, 6) for k, v in hada.items() if k != "method"} == {k: round(v, 6) for k, v in want.items()}
    assert doc["fusion"]["config"]["model"]["reference_bug"] is bug and doc["fusion"]["best_epoch"] == 7
    assert doc["fusion"]["learned"] == pytest.approx({"temperature": 0.05, **({"w": 0.3} if weighted else {})})
    # The other encoding would give another table: the bug and the weighting are really in play.
    with torch.no_grad():
        assert oracle_recall(img, cap, cache, not bug, 0.3 if weighted else None)["rsum"] != want["rsum"]


def test_encoding_in_blocks_keeps_the_reference_bugs_batches(tmp_path, caplog):
    """With the bug a sample's embedding depends on its batch: streamed in blocks (a tiny --memory-gb), the blocks
    hold whole batches of 20 in split order, so the hada row is still the oracle's."""
    import json
    import logging

    from conftest import run_cli

    cache, runs = synthetic_cache(tmp_path / "cache"), tmp_path / "runs"
    torch.manual_seed(4)
    img, cap = ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED), ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED)
    for p in [*img.parameters(), *cap.parameters()]:
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path / "best.pth.tar"
    torch.save(ref.reference_checkpoint(img, cap, ref.Discriminator(EMBED), 0.05, 0), path)
    run_cli("import-hada", path, "--dataset", "syn", "--backbones", "a,b", "--run", "imp", "--cache", cache,
            "--runs", runs)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        run_cli("score", "--dataset", "syn", "--run", "imp", "--cache", cache, "--runs", runs, "--json",
                tmp_path / "s.json", "--memory-gb", 2e-5)
    assert any("blocks of 20" in r.message for r in caplog.records)  # several blocks of one batch each
    hada = next(r for r in json.loads((tmp_path / "s.json").read_text())["rows"] if r["method"] == "hada")
    with torch.no_grad():
        want = oracle_recall(img.eval(), cap.eval(), cache, True, None)
    assert {k: round(v, 6) for k, v in hada.items() if k != "method"} == {k: round(v, 6) for k, v in want.items()}


def test_import_refuses_bad_checkpoints_and_writes_nothing(tmp_path):
    from conftest import run_cli

    cache, runs = synthetic_cache(tmp_path / "cache"), tmp_path / "runs"
    img, cap = ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED), ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED)
    good = ref.reference_checkpoint(img, cap, ref.Discriminator(EMBED), 0.05, 0)

    def attempt(state, *extra, backbones="a,b"):
        path = tmp_path / "c.pth.tar"
        torch.save(state, path)
        out = run_cli("import-hada", path, "--dataset", "syn", "--backbones", backbones, "--run", "r", "--cache",
                      cache, "--runs", runs, *extra, expect=2).output
        assert not (runs / "r").exists() and out.count("\n") == 1, out
        return out

    extra_key = {**good, "img_encoder": {**good["img_encoder"], "enc.gcn.gcn.norm.0.weight": torch.ones(3)}}
    assert "unknown keys ['enc.gcn.gcn.norm.0.weight']" in attempt(extra_key)
    missing = {**good, "cap_encoder": {k: v for k, v in good["cap_encoder"].items() if "lin_edge" not in k}}
    assert "cap_encoder: missing keys ['enc.gcn.gcn.conv.0.lin_edge.weight']" in attempt(missing)
    wide = ref.MH(D + 2, D + 2, E1, E2, WIDTH, HEADS, EMBED)
    assert "node widths: checkpoint [14, 14], stores [12, 12]" in attempt(
        ref.reference_checkpoint(wide, wide, ref.Discriminator(EMBED), 0.05, 0))
    assert "exactly two backbones" in attempt(good, backbones="a")
    assert "no val or test split" in attempt(good, backbones="a,zz")
    assert "not a HADA-LAVIS checkpoint" in attempt({"model": {}})
    import datetime

    assert "cannot be loaded safely: GLOBAL datetime.date is not allowed" in attempt(
        {**good, "saved": datetime.date(2023, 1, 1)})
    (tmp_path / "junk.pth.tar").write_text("not a checkpoint")
    out = run_cli("import-hada", tmp_path / "junk.pth.tar", "--dataset", "syn", "--backbones", "a,b", "--run", "r",
                  "--cache", cache, "--runs", runs, expect=2).output
    assert "junk.pth.tar cannot be loaded safely: not a PyTorch file, or a damaged one" in out


def as_numpy_1_pickle(src, dst):
    """Rewrite a torch.save file the way numpy 1 (the reference's era) pickles numpy scalars: numpy.core,
    where numpy 2 writes numpy._core."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                old = b"numpy._core.multiarray\nscalar"
                assert old in data
                data = data.replace(old, b"numpy.core.multiarray\nscalar")
            out.writestr(item, data)


def test_import_reads_numpy_scalars_pickled_by_numpy_1_and_2(tmp_path):
    from conftest import run_cli

    cache, runs = synthetic_cache(tmp_path / "cache"), tmp_path / "runs"
    img, cap = ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED), ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED)
    state = {**ref.reference_checkpoint(img, cap, ref.Discriminator(EMBED), 0.05, 0), "best_loss": np.float64(0.25)}
    torch.save(state, tmp_path / "numpy2.pth.tar")
    as_numpy_1_pickle(tmp_path / "numpy2.pth.tar", tmp_path / "numpy1.pth.tar")
    for name in ("numpy2", "numpy1"):
        run_cli("import-hada", tmp_path / f"{name}.pth.tar", "--dataset", "syn", "--backbones", "a,b", "--run", name,
                "--cache", cache, "--runs", runs)
        assert (runs / name / "best.pt").is_file()
    synthetic_cache(cache, dataset="other")
    out = run_cli("score", "--dataset", "other", "--run", "numpy1", "--cache", cache, "--runs", runs, expect=2).output
    assert "run 'numpy1' was trained on dataset 'syn', not 'other'" in out


def test_second_stage_from_an_imported_checkpoint(tmp_path):
    """The authors' stage-one checkpoint, imported, starts `fuse --weighted --init` (an imported run records
    no train split index), which takes its model settings, the reference bug included."""
    import json

    from conftest import run_cli

    cache, runs = synthetic_cache(tmp_path / "cache", splits=("train", "val", "test")), tmp_path / "runs"
    img, cap = ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED), ref.MH(D, D, E1, E2, WIDTH, HEADS, EMBED)
    torch.save(ref.reference_checkpoint(img, cap, ref.Discriminator(EMBED), 0.05, 0), tmp_path / "c.pth.tar")
    run_cli("import-hada", tmp_path / "c.pth.tar", "--dataset", "syn", "--backbones", "a,b", "--run", "authors",
            "--cache", cache, "--runs", runs)
    out = run_cli("fuse", "--init", "authors", "--weighted", "--run", "stage2", "--epochs", 1, "--cache", cache,
                  "--runs", runs).output
    assert "stage2: 1 epochs" in out
    config = json.loads((runs / "stage2" / "config.json").read_text())["config"]
    assert config["model"]["weighted"] is True and config["model"]["reference_bug"] is True
    assert config["model"]["width"] == WIDTH and config["backbones"] == "a,b"


def test_resume_or_init_refuses_stores_of_another_width():
    from data.errors import PipelineError
    from fuse.train import check_saved_run

    dims = {"image_tokens": [12, 12], "image_embeds": [6, 9], "text_tokens": [12, 12], "text_embeds": [6, 9]}
    saved = {"index_versions": {"val": "v1"}, "dims": dims}
    check_saved_run(saved, {"train": "t1", "val": "v1"}, dims, ["a", "b"], "run r")  # no train recorded: fine
    with pytest.raises(PipelineError, match="split index v1, but the cache's is v2"):
        check_saved_run(saved, {"train": "t1", "val": "v2"}, dims, ["a", "b"], "run r")
    wider = {**dims, "text_embeds": [6, 16]}
    with pytest.raises(PipelineError, match="b text embeds of width 9, but the cache's store 'b' now has 16"):
        check_saved_run(saved, {"val": "v1"}, wider, ["a", "b"], "run r")
