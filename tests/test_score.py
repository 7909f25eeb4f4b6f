"""Stage three: the score table from cached embeddings, external matrices, and the refusals."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY_FUSE, run_cli
from data.index import SplitIndex, index_path
from data.store import FeatureStore
from evaluate import retrieval_recall
from evaluate.coverage import recall_with_missing

KEYS = ["method", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


@pytest.fixture(scope="module")
def fused_run(demo_cache, tmp_path_factory):
    _, cache = demo_cache
    runs = tmp_path_factory.mktemp("runs")
    run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,clip-tiny", "--cache", cache, "--runs", runs,
            "--epochs", 3, "--run", "r", *TINY_FUSE)
    return cache, runs


def test_score_table_json_markdown_and_plot(fused_run, tmp_path):
    cache, runs = fused_run
    out = run_cli("score", "--dataset", "demo", "--cache", cache, "--runs", runs, "--json", tmp_path / "s.json",
                  "--plot", tmp_path / "recall.png").output
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["dataset"] == "demo" and doc["split"] == "test" and doc["run"] == "r"
    assert [r["method"] for r in doc["rows"]] == ["blip-tiny", "clip-tiny", "late-fusion", "hada"]
    for row in doc["rows"]:
        assert list(row) == KEYS
        assert row["rsum"] == pytest.approx(sum(row[k] for k in KEYS[1:-1]))
        assert row["method"] in out
    assert "random-initialised" in out and "random_init" in doc["notes"]
    assert (tmp_path / "s.md").read_text().count("|") > 20
    assert (tmp_path / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The backbone rows are the recall of the cached retrieval embeddings, computed independently here.
    index = SplitIndex.load(index_path(cache, "demo", "test"))
    store = FeatureStore.at(cache, "demo", "test", "blip-tiny")
    img, txt = store.load("images", tokens=False), store.load("texts", tokens=False)
    expected = retrieval_recall(img.embeds @ txt.embeds.T, index.text_to_image)
    assert doc["rows"][0]["rsum"] == pytest.approx(expected["rsum"])

    # The late-fusion weights are the ones tuned on val.
    from evaluate.late_fusion import tune_weights

    val = SplitIndex.load(index_path(cache, "demo", "val"))
    sims = []
    for name in ("blip-tiny", "clip-tiny"):
        s = FeatureStore.at(cache, "demo", "val", name)
        sims.append(s.load("images", tokens=False).embeds @ s.load("texts", tokens=False).embeds.T)
    weights = tune_weights([torch.from_numpy(s) for s in sims], val.text_to_image)
    assert list(doc["notes"]["late_fusion_weights"].values()) == pytest.approx(list(weights))


def test_scoring_val_says_it_is_optimistic(fused_run, tmp_path):
    cache, runs = fused_run
    for split, warned in (("val", True), ("test", False)):
        out = run_cli("score", "--dataset", "demo", "--split", split, "--cache", cache, "--runs", runs).output
        assert ("tuned_on_val: this table scores the val split" in out) is warned


def test_rerank_rows(fused_run, tmp_path):
    cache, runs = fused_run
    run_cli("score", "--dataset", "demo", "--cache", cache, "--runs", runs, "--rerank", "--qbnorm", "--dbnorm",
            "--json", tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    methods = [r["method"] for r in doc["rows"]]
    assert methods[4:] == ["blip-tiny+rerank", "clip-tiny+rerank", "hada+rerank", "blip-tiny+qbnorm",
                           "blip-tiny+dbnorm", "clip-tiny+qbnorm", "clip-tiny+dbnorm", "hada+qbnorm", "hada+dbnorm"]
    assert set(doc["notes"]["qbnorm_betas"]["hada"]) == {"i2t", "t2i"}
    assert len(doc["notes"]["dbnorm_betas"]["hada"]["t2i"]) == 2  # (beta1, beta2)


def test_external_similarity_matrices(fused_run, tmp_path):
    cache, _ = fused_run
    index = SplitIndex.load(index_path(cache, "demo", "test"))
    store = FeatureStore.at(cache, "demo", "test", "blip-tiny")
    sims = store.load("images", tokens=False).embeds @ store.load("texts", tokens=False).embeds.T
    np.save(tmp_path / "a.npy", sims)
    torch.save(torch.from_numpy(sims[::-1].copy()), tmp_path / "b.pt")
    run_cli("score", "--dataset", "demo", "--cache", cache, "--sims", tmp_path / "a.npy", "--sims", tmp_path / "b.pt",
            "--json", tmp_path / "s.json")
    rows = {r["method"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert set(rows) == {"a", "b", "late-fusion"}
    assert rows["a"]["rsum"] == pytest.approx(retrieval_recall(sims, index.text_to_image)["rsum"])

    np.save(tmp_path / "wrong.npy", sims[:, :-1])
    out = run_cli("score", "--dataset", "demo", "--cache", cache, "--sims", tmp_path / "wrong.npy", expect=2).output
    assert f"expected ({len(index.images)}, {len(index.captions)})" in out and "Traceback" not in out

    (tmp_path / "junk.pt").write_text("not a tensor file")
    out = run_cli("score", "--dataset", "demo", "--cache", cache, "--sims", tmp_path / "junk.pt", expect=2).output
    assert out.count("\n") == 1 and "junk.pt cannot be loaded safely: not a PyTorch file" in out
    for extra in (("--run", "r"), ("--rerank",), ("--qbnorm",), ("--dbnorm",)):
        out = run_cli("score", "--dataset", "demo", "--cache", cache, "--sims", tmp_path / "a.npy", *extra,
                      expect=2).output
        assert f"{extra[0]} cannot be combined with --sims" in out
    (tmp_path / "other").mkdir()
    np.save(tmp_path / "other" / "a.npy", sims)
    run_cli("score", "--dataset", "demo", "--cache", cache, "--sims", tmp_path / "a.npy", "--sims",
            tmp_path / "other" / "a.npy", "--json", tmp_path / "s2.json")
    methods = [r["method"] for r in json.loads((tmp_path / "s2.json").read_text())["rows"]]
    assert methods == [str(tmp_path / "a"), str(tmp_path / "other" / "a"), "late-fusion"]
    torch.save(torch.from_numpy(sims), tmp_path / "a.pt")
    run_cli("score", "--dataset", "demo", "--cache", cache, "--sims", tmp_path / "a.npy", "--sims",
            tmp_path / "a.pt", "--json", tmp_path / "s3.json")
    methods = [r["method"] for r in json.loads((tmp_path / "s3.json").read_text())["rows"]]
    assert methods == [str(tmp_path / "a.npy"), str(tmp_path / "a.pt"), "late-fusion"]


def test_scoring_against_another_split_index_is_refused(fused_run, tmp_path):
    import shutil

    cache, runs = fused_run
    shutil.copytree(runs / "r", tmp_path / "runs" / "r")
    manifest = tmp_path / "runs" / "r" / "embeds" / "test" / "manifest.json"
    obj = json.loads(manifest.read_text())
    obj["fingerprint"]["index_version"] = "feedfacefeedface"
    obj["fingerprint"]["checkpoint_mtime_ns"] = (tmp_path / "runs" / "r" / "best.pt").stat().st_mtime_ns
    manifest.write_text(json.dumps(obj))
    from evaluate.score import read_embeddings

    index = SplitIndex.load(index_path(cache, "demo", "test"))
    with pytest.raises(Exception, match="split index version feedfacefeedface"):
        read_embeddings(FeatureStore(manifest.parent), "hada", index)


def test_images_excluded_at_extraction_count_as_misses():
    rng = np.random.default_rng(1)
    t2i = np.repeat(np.arange(5), [1, 2, 3, 2, 1])
    sims = rng.normal(size=(5, 9)).astype(np.float32)
    sims[2, t2i == 2] = 10  # image 2 finds its captions first, and they find it
    full = recall_with_missing(sims, np.arange(5), t2i, 5)
    assert full == retrieval_recall(sims, t2i)
    present = [0, 1, 3, 4]
    partial = recall_with_missing(sims[present], present, t2i, 5)
    # Image 2 is absent: it misses every i2t K, and its 3 captions miss every t2i K.
    assert partial["i2t_r10"] <= 80.0 and partial["t2i_r10"] <= 100 * 6 / 9
    assert partial["t2i_r1"] < full["t2i_r1"]


def test_a_run_saved_by_another_version_is_refused_in_one_line(fused_run, tmp_path):
    import shutil

    cache, runs = fused_run
    shutil.copytree(runs / "r", tmp_path / "runs" / "r")
    path = tmp_path / "runs" / "r" / "config.json"
    obj = json.loads(path.read_text())
    obj["config"]["model"]["nosuch"] = 1
    path.write_text(json.dumps(obj))
    out = run_cli("score", "--dataset", "demo", "--cache", cache, "--runs", tmp_path / "runs", "--run", "r",
                  expect=2).output
    assert out.count("\n") == 1 and "['model.nosuch'] are unknown to this version" in out, out
