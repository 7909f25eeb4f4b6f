"""`pipeline export`: clip-retrieval's layout, read back with numpy and pyarrow, equals the store."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_FUSE, run_cli
from data.datasets import image_folder
from data.index import SplitIndex, index_path
from data.store import FeatureStore
from export.layout import part_names


def read_export(out: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Parts in the readers' (lexicographic) order, each file's header checked as embedding-reader parses it."""
    import pyarrow.parquet as pq

    images, texts, meta = [], [], []
    for folder, into in (("img_emb", images), ("text_emb", texts)):
        for path in sorted((out / folder).glob("*.npy")):
            first_line = path.read_bytes()[:300].split(b"\n")[0]
            shape = re.search(r"'shape': \(([0-9]+), ([0-9]+)\)", str(first_line))
            assert shape and re.search(r"'descr': '([<f0-9]+)'", str(first_line)), first_line
            into.append(np.load(path, allow_pickle=False))
            assert into[-1].shape == (int(shape.group(1)), int(shape.group(2)))
    for path in sorted((out / "metadata").glob("*.parquet")):
        meta += pq.read_table(path).to_pylist()
    return np.concatenate(images), np.concatenate(texts), meta


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """The toy test split extracted with clip-tiny, one image missing (--skip-bad)."""
    from conftest import write_karpathy

    base = tmp_path_factory.mktemp("export")
    write_karpathy(base / "datasets", "toy", {"train": 2, "val": 2, "test": 8})
    (base / "datasets" / "toy" / "images" / "img_0006.jpg").unlink()  # test row 2
    run_cli("extract", "--backbone", "clip-tiny", "--dataset", "toy", "--split", "test", "--data-root",
            base / "datasets", "--cache", base / "cache", "--workers", 0, "--skip-bad")
    return base


def test_backbone_export_reads_back_as_the_store(toy_store, tmp_path):
    cache = toy_store / "cache"
    out = run_cli("export", "--backbone", "clip-tiny", "--split", "test", "--cache", cache, "--out", tmp_path / "x",
                  "--part-size", 3, "--dtype", "float32").output
    assert "7 images of toy/test (backbone clip-tiny; 1 not in the store)" in out and "3 part(s)" in out
    assert sorted(p.name for p in (tmp_path / "x" / "img_emb").iterdir()) == [f"img_emb_{k}.npy" for k in range(3)]
    assert sorted(p.name for p in (tmp_path / "x" / "metadata").iterdir()) == \
        [f"metadata_{k}.parquet" for k in range(3)]
    images, texts, meta = read_export(tmp_path / "x")
    store = FeatureStore.at(cache, "toy", "test", "clip-tiny")
    index = SplitIndex.load(index_path(cache, "toy", "test"))
    want_images, want_texts = store.load("images", tokens=False), store.load("texts", tokens=False)
    rows = [r for r in range(8) if r != 2]
    first = index.caption_offsets[rows]
    assert images.dtype == np.float32 and images.shape == (7, want_images.embeds.shape[1])
    np.testing.assert_allclose(images, want_images.embeds, atol=1e-6)
    np.testing.assert_allclose(texts, want_texts.embeds[first], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert [m["row"] for m in meta] == rows
    assert [m["caption"] for m in meta] == [index.captions[c] for c in first]
    folder = toy_store / "datasets" / "toy" / "images"
    assert [m["image_path"] for m in meta] == [str(folder / index.images[r]) for r in rows]
    summary = json.loads((tmp_path / "x" / "export.json").read_text())
    assert summary["images"] == 7 and summary["index_version"] == index.version and len(summary["parts"]) == 3


def test_float16_single_part_and_overwrite(toy_store, tmp_path):
    cache, out = toy_store / "cache", tmp_path / "x"
    args = ("export", "--backbone", "clip-tiny", "--split", "test", "--cache", cache, "--out", out)
    run_cli(*args, "--part-size", 2)
    refused = run_cli(*args, expect=2).output
    assert f"--out {out} already holds an export" in refused and "--overwrite" in refused
    run_cli(*args, "--overwrite")
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy"]  # the 4 older parts removed
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == ["text_emb_0.npy"]
    images, texts, meta = read_export(out)
    store = FeatureStore.at(cache, "toy", "test", "clip-tiny")
    assert images.dtype == np.float16 and len(meta) == 7
    np.testing.assert_allclose(images.astype(np.float32), store.load("images", tokens=False).embeds, atol=2e-3)


def test_run_export_is_the_fused_embeddings_score_uses(demo_cache, tmp_path):
    _, cache = demo_cache
    run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,clip-tiny", "--cache", cache,
            "--runs", tmp_path / "runs", *TINY_FUSE, "--epochs", 1, "--run", "r")
    out = run_cli("export", "--run", "r", "--runs", tmp_path / "runs", "--split", "test", "--cache", cache,
                  "--out", tmp_path / "x", "--dtype", "float32").output
    assert "60 images of demo/test (run r; 0 not in the store)" in out
    images, texts, meta = read_export(tmp_path / "x")
    fused = FeatureStore(tmp_path / "runs" / "r" / "embeds" / "test")
    index = SplitIndex.load(index_path(cache, "demo", "test"))
    np.testing.assert_allclose(images, fused.load("images", tokens=False).embeds, atol=1e-6)
    np.testing.assert_allclose(texts, fused.load("texts", tokens=False).embeds[index.caption_offsets[:-1]], atol=1e-6)
    assert [m["row"] for m in meta] == list(range(60))


def test_export_refusals(toy_store, tmp_path):
    cache = toy_store / "cache"
    base = ("export", "--split", "test", "--cache", cache, "--out", tmp_path / "x")
    assert "--run RUN (fused embeddings) or --backbone SPEC" in run_cli(*base, expect=2).output
    assert "one of them" in run_cli(*base, "--run", "r", "--backbone", "clip-tiny", expect=2).output
    assert "has no test store" in run_cli(*base, "--backbone", "blip-tiny", expect=2).output
    (tmp_path / "f").write_text("")
    assert "a file, not a folder" in run_cli(*base[:-1], tmp_path / "f", "--backbone", "clip-tiny", expect=2).output


def test_part_names_sort_in_row_order_and_image_folders():
    names = [p["img_emb"] for p in part_names(12)]
    assert names[0] == "img_emb_00.npy" and names[-1] == "img_emb_11.npy" and names == sorted(names)
    assert part_names(1) == [{"img_emb": "img_emb_0.npy", "text_emb": "text_emb_0.npy",
                              "metadata": "metadata_0.parquet"}]
    assert image_folder({"webdataset": "s/{0..3}.tar", "annotations": None}) is None
    assert image_folder({"annotations": "a.parquet", "images": None}) is None
    assert image_folder({"annotations": "a.csv", "images": "imgs"}) == Path("imgs")
    assert image_folder({"dataset": "coco", "data_root": "d"}) == Path("d/coco/images")


def test_export_sits_above_the_caches_and_below_nothing():
    """export/ reads stores and runs (data/, fuse/, evaluate/), never a live backbone; no stage imports it."""
    from tests.test_fuse_train import imported_top_level

    assert not imported_top_level("export") & {"extract", "open_clip", "transformers"}
    assert "export" not in set().union(*(imported_top_level(p) for p in ("data", "extract", "fuse", "evaluate")))
