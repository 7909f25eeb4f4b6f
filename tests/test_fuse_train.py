"""Stage two end to end on tiny-backbone features: training, resume, second stage, refusals."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY_FUSE, run_cli
from data.errors import PipelineError
from data.store import FeatureStore


def fuse(demo_cache, runs, *args, expect=0):
    _, cache = demo_cache
    return run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,clip-tiny", "--cache", cache,
                   "--runs", runs, *TINY_FUSE, *args, expect=expect)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def chance_rsum(n_images: int, caps_per_image: int = 5) -> float:
    """Expected rsum of random scores: t2i R@K = K/n; i2t R@K = 1 - C(M-c, K)/C(M, K)."""
    from math import comb

    m = n_images * caps_per_image
    t2i = sum(100 * k / n_images for k in (1, 5, 10))
    i2t = sum(100 * (1 - comb(m - caps_per_image, k) / comb(m, k)) for k in (1, 5, 10))
    return t2i + i2t


def test_training_learns_and_writes_the_run(demo_cache, tmp_path):
    fuse(demo_cache, tmp_path, "--epochs", 6, "--run", "r")
    run = tmp_path / "r"
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    for key in ("loss", "loss_itc", "loss_itm", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                "rsum", "seconds"):
        assert all(key in r for r in rows), key
    assert rows[-1]["loss_itm"] < rows[0]["loss_itm"]
    best = max(r["rsum"] for r in rows)
    assert best > 1.5 * chance_rsum(60), (best, chance_rsum(60))
    for name in ("best.pt", "last.pt", "config.json", "curves.png"):
        assert (run / name).is_file()
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 6 and "optimizer" in state and "scheduler" in state and "rng" in state
    assert "image_queue" in " ".join(state["model"])
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["epochs"] == 6 and config["backbones"] == ["blip-tiny", "clip-tiny"]
    fused = FeatureStore(run / "embeds" / "test")
    assert len(fused.load("images", tokens=False)) == 60 and len(fused.load("texts", tokens=False)) == 300


def test_resume_continues_exactly_like_an_uninterrupted_run(demo_cache, tmp_path):
    fuse(demo_cache, tmp_path, "--epochs", 3, "--run", "straight")
    fuse(demo_cache, tmp_path, "--epochs", 1, "--run", "cut")
    first = metrics(tmp_path / "cut")
    fuse(demo_cache, tmp_path, "--epochs", 3, "--run", "cut", "--resume")
    drop = ("seconds", "pairs_per_s")
    a = [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "straight")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "cut")]
    assert b[0] == {k: v for k, v in first[0].items() if k not in drop}  # logged epochs stay as they were
    assert a == b
    out = fuse(demo_cache, tmp_path, "--epochs", 3, "--run", "cut", expect=2).output
    assert "--resume" in out


def test_weighted_second_stage_starts_from_a_run(demo_cache, tmp_path):
    fuse(demo_cache, tmp_path, "--epochs", 1, "--run", "s1")
    fuse(demo_cache, tmp_path, "--epochs", 1, "--run", "s2", "--weighted", "--init", "s1")
    state = torch.load(tmp_path / "s2" / "best.pt", weights_only=True)
    assert 0.1 <= float(state["model"]["w"]) <= 0.9
    fused = FeatureStore(tmp_path / "s2" / "embeds" / "val").load("images", tokens=False)
    assert fused.embeds.shape[1] == 64 + 16  # fused part + BLIP-tiny's own projection, mixed by sqrt weights
    np.testing.assert_allclose(np.linalg.norm(fused.embeds, axis=1), 1, atol=1e-5)


def test_streaming_mode_when_features_exceed_the_memory_budget(demo_cache, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="pipeline.fuse"):
        fuse(demo_cache, tmp_path, "--epochs", 1, "--run", "s", "--memory-gb", 0.0005)
    assert "streaming" in caplog.text
    assert metrics(tmp_path / "s")[0]["rsum"] > 0


def test_mismatches_are_refused_with_the_difference_named(demo_cache, tmp_path):
    _, cache = demo_cache
    out = run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,nope", "--cache", cache, "--runs", tmp_path,
                  expect=2).output
    assert "nope not cached for both train and val" in out
    out = run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny", "--cache", cache, "--runs", tmp_path,
                  expect=2).output
    assert "two or more" in out
    fuse(demo_cache, tmp_path, "--epochs", 1, "--run", "x")
    out = run_cli("fuse", "--dataset", "demo", "--backbones", "clip-tiny,blip-tiny", "--cache", cache, "--runs",
                  tmp_path, *TINY_FUSE, "--run", "x", "--resume", "--epochs", 2, expect=2).output
    assert out.count("\n") == 1
    assert "--backbones: the run resumed has 'blip-tiny,clip-tiny', now 'clip-tiny,blip-tiny'" in out
    for flag, value, saved in (("--width", 32, 64), ("--dropout", 0.2, 0.1), ("--queue-size", 64, 512),
                               ("--w-global", 1.0, 1.1), ("--batch-size", 16, 64), ("--reference-bug", None, False)):
        args = (flag,) if value is None else (flag, value)
        out = run_cli("fuse", "--cache", cache, "--runs", tmp_path, "--run", "x", "--resume", "--epochs", 2, *args,
                      expect=2).output
        assert out.startswith(f"Error: {flag}: the run resumed has {saved!r}") and out.count("\n") == 1, out
    assert not (tmp_path / "x" / "metrics.jsonl").read_text().count("\n") > 1  # nothing trained meanwhile


def test_resume_and_init_adopt_the_saved_settings_and_say_so(demo_cache, tmp_path, caplog):
    import logging

    _, cache = demo_cache
    fuse(demo_cache, tmp_path, "--epochs", 1, "--run", "a")
    with caplog.at_level(logging.INFO, logger="pipeline.fuse"):
        run_cli("fuse", "--cache", cache, "--runs", tmp_path, "--run", "a", "--resume", "--epochs", 2)
    assert "keeping the saved run's" in caplog.text and "--width 64" in caplog.text
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["model"]["width"] == 64
    assert len(metrics(tmp_path / "a")) == 2
    with caplog.at_level(logging.INFO, logger="pipeline.fuse"):
        run_cli("fuse", "--cache", cache, "--runs", tmp_path, "--run", "a", "--resume", "--epochs", 2)
    assert "run a has trained 2 epochs already, --epochs is 2: nothing to train" in caplog.text
    assert len(metrics(tmp_path / "a")) == 2
    # A second stage may change its recipe, not the shapes of the weights it loads.
    out = run_cli("fuse", "--cache", cache, "--runs", tmp_path, "--init", "a", "--weighted", "--run", "b",
                  "--width", 32, expect=2).output
    assert "--width: the run loaded with --init has 64, now 32" in out
    run_cli("fuse", "--cache", cache, "--runs", tmp_path, "--init", "a", "--weighted", "--run", "b", "--epochs", 1,
            "--lr", 1e-4)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["config"]
    assert saved["model"]["width"] == 64 and saved["model"]["weighted"] and saved["lr"] == 1e-4
    assert saved["dataset"] == "demo" and saved["backbones"] == "blip-tiny,clip-tiny"


def test_index_version_mismatch_is_refused(demo_cache, tmp_path):
    import shutil

    from fuse.data import open_stores

    _, cache = demo_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache / "demo" / "val", copy / "demo" / "val")
    manifest = copy / "demo" / "val" / "clip-tiny" / "manifest.json"
    obj = json.loads(manifest.read_text())
    obj["fingerprint"]["index_version"] = "0000000000000000"
    manifest.write_text(json.dumps(obj))
    with pytest.raises(PipelineError, match="made from split index version 0000000000000000"):
        open_stores(copy, "demo", "val", ["blip-tiny", "clip-tiny"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_cache, tmp_path, monkeypatch):
    from fuse import train as train_module
    from fuse.config import FuseConfig

    _, cache = demo_cache
    from data.options import from_options

    cfg = dict(dataset="demo", backbones="blip-tiny,clip-tiny", cache=str(cache), runs=str(tmp_path), run="nan",
               width=64, embed_dim=64, queue_size=512, batch_size=64)
    train_module.train(from_options(FuseConfig, {"epochs": 1, **cfg}))
    good = (tmp_path / "nan" / "last.pt").read_bytes()
    original = train_module.HadaModel.forward

    def poisoned(self, *a, **k):
        out = original(self, *a, **k)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(train_module.HadaModel, "forward", poisoned)
    with pytest.raises(PipelineError, match="non-finite loss"):
        train_module.train(from_options(FuseConfig, {"epochs": 2, "resume": True, **cfg}))
    assert (tmp_path / "nan" / "last.pt").read_bytes() == good


def imported_top_level(package: str) -> set[str]:
    """Top-level modules that a package's own files import (static: import statements)."""
    import ast
    from pathlib import Path

    names = set()
    for path in (Path(__file__).resolve().parents[1] / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_stage_boundaries_in_imports():
    """data/ imports no other stage; fuse/ never the backbone libraries or extract/; evaluate/ only data/."""
    assert not imported_top_level("data") & {"extract", "fuse", "evaluate", "open_clip", "transformers"}
    assert not imported_top_level("fuse") & {"extract", "open_clip", "transformers"}
    assert not imported_top_level("evaluate") & {"extract", "fuse", "open_clip", "transformers", "torch_geometric"}
    assert not imported_top_level("extract") & {"fuse", "evaluate", "torch_geometric"}
