"""`pipeline search`: live queries through a run against its cached fused embeddings, exact and FAISS."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from data.index import SplitIndex, index_path
from data.store import FeatureStore
from evaluate.config import ScoreConfig


@pytest.fixture(scope="module")
def scored(demo_run):
    """The score result of the run on the test split (its per-query ranks) and the split index."""
    from pipeline import _score

    cache, runs, run = demo_run
    result = _score(ScoreConfig(dataset="demo", cache=str(cache), runs=str(runs), run=run))
    return result, SplitIndex.load(index_path(cache, "demo", "test"))


def search(demo_run, tmp_path, *args, expect=0):
    cache, runs, run = demo_run
    out = run_cli("search", *args, "--run", run, "--cache", cache, "--runs", runs, "--json", tmp_path / "s.json",
                  expect=expect).output
    return out, (json.loads((tmp_path / "s.json").read_text()) if expect == 0 else None)


def test_a_held_out_caption_finds_its_image_at_the_rank_score_reports(demo_run, scored, tmp_path, one_thread):
    result, index = scored
    t2i_ranks = result["ranks"]["hada"][1]
    fused = FeatureStore(demo_run[1] / "r" / "embeds" / "test")
    images, texts = fused.load("images", tokens=False), fused.load("texts", tokens=False)
    n = len(index.images)
    for caption in (0, 7, 123, len(index.captions) - 1):
        out, doc = search(demo_run, tmp_path, index.captions[caption], "--top", n)
        assert list(doc) == ["query", "run", "split", "results"]
        assert doc["query"] == index.captions[caption] and doc["run"] == "r" and doc["split"] == "test"
        rows = [r["row"] for r in doc["results"]]
        assert [r["rank"] for r in doc["results"]] == list(range(1, n + 1)) and sorted(rows) == list(range(n))
        truth = int(index.text_to_image[caption])
        assert rows.index(truth) == t2i_ranks[caption], (caption, rows.index(truth), t2i_ranks[caption])
        # Every score is the cached fused similarity of that caption: the live query is embedded as extraction did.
        expected = images.embeds @ texts.embeds[caption]
        got = np.array([r["score"] for r in doc["results"]])
        np.testing.assert_allclose(got, expected[rows], atol=1e-5)
        assert all(list(r) == ["rank", "score", "row", "image"] and r["image"] == index.images[r["row"]]
                   for r in doc["results"])
        assert f"   1  {got[0]:7.4f}  {index.images[rows[0]]}" in out

    _, doc = search(demo_run, tmp_path, index.captions[0], "--top", 3)
    assert len(doc["results"]) == 3


def test_an_image_finds_its_captions_at_the_rank_score_reports_and_itself_first(demo_run, demo_cache, scored,
                                                                                 tmp_path, one_thread):
    result, index = scored
    i2t_ranks = result["ranks"]["hada"][0]
    image = 5
    path = demo_cache[0] / "demo" / "images" / index.images[image]
    _, doc = search(demo_run, tmp_path, "--image", path, "--top", len(index.captions))
    assert doc["query"] == str(path)
    assert all(list(r) == ["rank", "score", "row", "caption"] and r["caption"] == index.captions[r["row"]]
               for r in doc["results"])
    own = [k for k, r in enumerate(doc["results"]) if index.text_to_image[r["row"]] == image]
    assert own[0] == i2t_ranks[image]

    _, doc = search(demo_run, tmp_path, "--image", path, "--target", "images", "--top", 2)
    assert doc["results"][0]["row"] == image and doc["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_blocks_within_memory_give_the_same_results(demo_run, scored, tmp_path, one_thread):
    _, index = scored
    _, whole = search(demo_run, tmp_path, index.captions[3], "--top", 10)
    # 64-d fused embeddings: 2e-6 GB is 2 candidates per block
    _, blocked = search(demo_run, tmp_path, index.captions[3], "--top", 10, "--memory-gb", 2e-6)
    assert [r["row"] for r in blocked["results"]] == [r["row"] for r in whole["results"]]


def test_exact_top_k_breaks_ties_by_the_lower_row():
    from search.exact import top_k

    embeds = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.5, 0.5]], np.float32)
    blocks = [(np.arange(a, min(a + 2, 5)), embeds[a:a + 2]) for a in range(0, 5, 2)]
    scores, rows = top_k(blocks[::-1], np.array([[1, 0]], np.float32), 3)  # blocks in any order
    assert rows[0].tolist() == [0, 2, 3] and scores[0].tolist() == [1, 1, 1]


def test_faiss_index_is_cached_keyed_by_the_embeddings_and_agrees_with_exact(demo_run, scored, tmp_path, one_thread):
    _, index = scored
    cache, runs, run = demo_run
    query = index.captions[11]
    _, exact = search(demo_run, tmp_path, query, "--top", 5, "--index", "exact")
    out, doc = search(demo_run, tmp_path, query, "--top", 5, "--index", "faiss")
    assert "built now" in out and "recall@10 1.000 against exact search" in out and "(FAISS index)" in out
    assert [r["row"] for r in doc["results"]] == [r["row"] for r in exact["results"]]
    folder = runs / run / "index" / "test"
    built = sorted(p.name for p in folder.iterdir())
    assert len(built) == 2 and built[0].startswith("images-") and built[0].endswith(".faiss")
    out, again = search(demo_run, tmp_path, query, "--top", 5, "--index", "faiss")
    assert "(cached, " in out and again == doc

    # The same embeddings rewritten: another key, the index rebuilt, the old one removed.
    shard = runs / run / "embeds" / "test" / "images-00000.h5"
    shutil.copy(shard, tmp_path / "copy.h5")
    shutil.move(tmp_path / "copy.h5", shard)
    out, _ = search(demo_run, tmp_path, query, "--top", 5, "--index", "faiss")
    assert "built now" in out
    rebuilt = sorted(p.name for p in folder.iterdir())
    assert len(rebuilt) == 2 and rebuilt != built


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_faiss_recall_against_exact_is_measured_and_above_the_bound(tmp_path, one_thread):
    """20,000 clustered candidates: the index probes a fraction of its lists and still finds >= 90% of the exact
    top 10 for fresh queries (the bound), as it measured when built (>= its 95% target)."""
    from fuse.encode import write_fused
    from search import faiss_index

    n, dim = 20_000, 32
    images, texts = clustered(n, dim, 200, 0), clustered(500, dim, 200, 1)
    root = tmp_path / "fused"
    write_fused(root, np.arange(n), torch.from_numpy(images), torch.from_numpy(texts), {"backbone": "hada", "x": 1})
    store = FeatureStore(root)
    index, info = faiss_index.cached_index(store, "images", "texts", tmp_path / "index", memory_gb=0.01)
    assert info["built"] and info["recall"] >= faiss_index.TARGET_RECALL and info["recall_queries"] == 200
    assert info["nlist"] == faiss_index.lists_for(n) > 100 and info["nprobe"] < info["nlist"] / 4

    fresh = clustered(300, dim, 200, 2)
    _, found = faiss_index.search(index, fresh, 10)
    exact = np.argsort(-(fresh @ images.T), axis=1, kind="stable")[:, :10]
    recall = np.mean([len(np.intersect1d(f, e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.9, recall

    again, info2 = faiss_index.cached_index(store, "images", "texts", tmp_path / "index", memory_gb=0.01)
    assert not info2["built"] and info2["nprobe"] == info["nprobe"]
    assert [f.tolist() for f in faiss_index.search(again, fresh, 10)[1]] == [f.tolist() for f in found]


def test_a_live_backbone_that_differs_from_its_store_is_refused_by_setting(demo_run, scored, tmp_path):
    cache, runs, run = demo_run
    _, index = scored
    copy = tmp_path / "cache"
    shutil.copytree(cache / "demo" / "test", copy / "demo" / "test")
    manifest = copy / "demo" / "test" / "clip-tiny" / "manifest.json"
    obj = json.loads(manifest.read_text())
    obj["fingerprint"]["image_size"] = 999
    manifest.write_text(json.dumps(obj))
    out = run_cli("search", index.captions[0], "--run", run, "--cache", copy, "--runs", runs, expect=2).output
    # the store differs from what the run was trained on: said first, before any weights are loaded
    assert out.count("\n") == 1 and "backbone clip-tiny, split test" in out
    assert "image_size: 32 (run r's) vs 999 (test)" in out, out
    # a run trained on such stores: the live backbone is what differs now
    shutil.copytree(runs / run, tmp_path / "runs" / run)
    config = tmp_path / "runs" / run / "config.json"
    saved = json.loads(config.read_text())
    saved["store_settings"]["clip-tiny"]["image_size"] = 999
    config.write_text(json.dumps(saved))
    out = run_cli("search", index.captions[0], "--run", run, "--cache", copy, "--runs", tmp_path / "runs",
                  expect=2).output
    assert out.count("\n") == 1 and "backbone clip-tiny as loaded now differs from its store" in out
    assert "image_size: 999 (stored) vs 32 (now)" in out, out


@pytest.mark.parametrize("args, message", [
    ((), "give one query: TEXT, or --image PATH"),
    (("a red circle", "--image", "x.jpg"), "not both"),
    (("  ",), "the query TEXT is empty"),
    (("--image", "nosuch.jpg"), "--image nosuch.jpg: no such file"),
    (("a red circle", "--dataset", "coco"), "--dataset coco: run 'r' was trained on 'demo'"),
    (("a red circle", "--split", "train", "--memory-gb", "-1"), "--memory-gb -1.0: need a positive number"),
])
def test_bad_queries_are_refused_in_one_line(demo_run, args, message):
    cache, runs, run = demo_run
    out = run_cli("search", *args, "--run", run, "--cache", cache, "--runs", runs, expect=2).output
    assert out.count("\n") == 1 and message in out, out


def test_an_unreadable_image_and_an_unknown_run_are_named(demo_run, tmp_path):
    cache, runs, run = demo_run
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    out = run_cli("search", "--image", tmp_path / "bad.jpg", "--run", run, "--cache", cache, "--runs", runs,
                  expect=2).output
    assert f"--image {tmp_path / 'bad.jpg'}: UnidentifiedImageError" in out
    out = run_cli("search", "a red circle", "--run", "nosuch", "--cache", cache, "--runs", runs, expect=2).output
    assert "nosuch is not a run (no config.json)" in out
