"""Never silently wrong: re-extracted splits, changed flags, two jobs at once, repaired images (issue 16).

Each case runs through the CLI where it can: tiny backbones, a small generated dataset, a one-epoch run.
"""
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY_FUSE, make_images, run_cli, write_karpathy
from data.index import SplitIndex, index_path
from data.store import FeatureStore, read_shard_attrs
from evaluate.coverage import recall_with_missing

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("blip-tiny", "clip-tiny")


def extract(data, cache, backbone, *args, split=None, expect=0):
    return run_cli("extract", "--backbone", backbone, "--dataset", "toy", "--data-root", data, "--cache", cache,
                   "--workers", 0, *(("--split", split) if split else ()), *args, expect=expect)


def fuse(base, *args, expect=0):
    return run_cli("fuse", "--dataset", "toy", "--cache", base / "cache", "--runs", base / "runs", "--epochs", 1,
                   *TINY_FUSE, *args, expect=expect)


def score(base, *args, cache=None, expect=0):
    return run_cli("score", "--dataset", "toy", "--cache", cache or base / "cache", "--runs", base / "runs", *args,
                   expect=expect)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> Path:
    """datasets/ (toy: 24 train, 8 val, 8 test images), cache/ of both tiny backbones (train with 1 view), and
    runs/r, one epoch."""
    base = tmp_path_factory.mktemp("never")
    write_karpathy(base / "datasets", "toy", {"train": 24, "val": 8, "test": 8})
    for backbone in BACKBONES:
        for split in ("train", "val", "test"):
            extract(base / "datasets", base / "cache", backbone, *(("--views", 1) if split == "train" else ()),
                    split=split)
    fuse(base, "--backbones", ",".join(BACKBONES), "--run", "r")
    return base


@pytest.fixture
def work(trained, tmp_path) -> Path:
    """A private copy of the trained fixture, for tests that change it."""
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w"


def reextract(base, backbone, split, *args, data=None):
    shutil.rmtree(base / "cache" / "toy" / split / backbone)
    extract(data or base / "datasets", base / "cache", backbone, *args, split=split)


# 1. Mixed features: one backbone's val store made with other settings than its train store.

def test_fuse_refuses_a_val_store_made_with_other_settings(work):
    reextract(work, "blip-tiny", "val", "--token-pool", 2)  # the same widths: nothing else would notice
    out = fuse(work, "--backbones", ",".join(BACKBONES), "--run", "r2", expect=2).output
    assert "backbone blip-tiny, split val" in out and "token_pool: 1 (train) vs 2 (val)" in out, out
    assert not (work / "runs" / "r2").exists()
    out = fuse(work, "--run", "r", "--resume", "--epochs", 2, expect=2).output  # a resume too
    assert "backbone blip-tiny, split val" in out and "token_pool" in out, out


def test_a_run_records_the_settings_of_its_stores(trained):
    config = json.loads((trained / "runs" / "r" / "config.json").read_text())
    for backbone in BACKBONES:
        settings = config["store_settings"][backbone]
        store = FeatureStore.at(trained / "cache", "toy", "train", backbone)
        assert settings == store.settings() and settings["precision"] == "fp32" and "views" not in settings


# 2. Stale fused embeddings: a re-extracted test store, or another --cache.

def test_score_refuses_a_test_store_made_with_other_settings_than_the_run(work):
    score(work, "--run", "r")
    reextract(work, "clip-tiny", "test", "--clip-tokens")
    out = score(work, "--run", "r", expect=2).output
    assert "backbone clip-tiny, split test" in out and "clip_tokens: False (run r's) vs True (test)" in out, out


def test_fused_embeddings_are_keyed_by_their_stores_and_cache(work, tmp_path):
    """Another cache whose test images were repaired: same settings and index, other features. The hada row
    must come from them, not from the embeddings the first cache gave."""
    def fused_images():
        with h5py.File(work / "runs" / "r" / "embeds" / "test" / "images-00000.h5", "r") as f:
            return f["embeds"][:]

    score(work, "--run", "r")
    first = fused_images()
    repaired = tmp_path / "repaired"
    shutil.copytree(work / "datasets", repaired)
    make_images(repaired / "toy" / "images", 40, seed=7)  # the same names, other pixels
    shutil.copytree(work / "cache", work / "cache2")
    shutil.rmtree(work / "cache2" / "toy" / "test" / "blip-tiny")
    extract(repaired, work / "cache2", "blip-tiny", split="test")
    score(work, "--run", "r", cache=work / "cache2")
    second = fused_images()
    manifest = FeatureStore(work / "runs" / "r" / "embeds" / "test").manifest()
    assert manifest["fingerprint"]["cache"] == str((work / "cache2").resolve())
    assert not np.allclose(first, second)
    shutil.rmtree(work / "runs" / "r" / "embeds" / "test")  # encoded afresh from cache2: the same
    score(work, "--run", "r", cache=work / "cache2")
    assert np.array_equal(fused_images(), second)
    # The same in place: the first cache's test store re-extracted from the repaired images, same settings.
    score(work, "--run", "r")
    assert np.allclose(fused_images(), first)
    reextract(work, "blip-tiny", "test", data=repaired)
    score(work, "--run", "r")
    assert np.array_equal(fused_images(), second)


# 3. One writer per store: two real `pipeline extract` processes, and a kill -9 of the lock holder.

def fifo_dataset(tmp_path) -> tuple[Path, Path]:
    """A toy dataset whose first test image is a named pipe: an extraction blocks on it, holding the lock, until
    the test writes the image."""
    data = tmp_path / "datasets"
    write_karpathy(data, "toy", {"test": 4})
    first = data / "toy" / "images" / "img_0000.jpg"
    jpeg = first.read_bytes()
    first.unlink()
    os.mkfifo(first)
    return data, jpeg


def start_extract(data, cache, log) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "extract", "--backbone", "clip-tiny", "--dataset", "toy",
           "--split", "test", "--data-root", str(data), "--cache", str(cache), "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_for_lock(store: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    lock = store / ".lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and f"pid {proc.pid} " in lock.read_text():
            return
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    raise AssertionError(f"the extraction never took the lock: {log.read_text()}")


@contextlib.contextmanager
def lock_holder(tmp_path):
    """A real `pipeline extract` holding its store's lock, blocked on the named pipe; killed on the way out if it
    is still running. Yields (data root, the first image's JPEG bytes, store folder, process)."""
    data, jpeg = fifo_dataset(tmp_path)
    store = tmp_path / "cache" / "toy" / "test" / "clip-tiny"
    proc = start_extract(data, tmp_path / "cache", tmp_path / "holder.log")
    try:
        wait_for_lock(store, proc, tmp_path / "holder.log")
        yield data, jpeg, store, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    with lock_holder(tmp_path) as (data, jpeg, store, first):
        in_progress = store / f".texts-00099.h5.{first.pid}.tmp"  # as if the holder were writing a shard
        in_progress.write_bytes(b"partial")
        second = start_extract(data, tmp_path / "cache", tmp_path / "second.log")
        assert second.wait(timeout=180) == 2
        said = (tmp_path / "second.log").read_text()
        assert f"the store {store} is being written by another process (pid {first.pid} on host" in said, said
        assert in_progress.is_file()  # the second writer touched nothing of the first's
        in_progress.unlink()
        with open(data / "toy" / "images" / "img_0000.jpg", "wb") as f:  # let the first one finish
            f.write(jpeg)
        assert first.wait(timeout=180) == 0, (tmp_path / "holder.log").read_text()
    assert FeatureStore(store).manifest()["complete"]
    assert len(FeatureStore(store).load("images")) == 4


def test_a_killed_lock_holder_leaves_a_store_that_resumes_cleanly(tmp_path):
    with lock_holder(tmp_path) as (data, jpeg, store, holder):
        (store / f".images-00000.h5.{holder.pid}.tmp").write_bytes(b"cut off")  # what a kill leaves behind
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    image = data / "toy" / "images" / "img_0000.jpg"
    image.unlink()
    image.write_bytes(jpeg)
    extract(data, tmp_path / "cache", "clip-tiny", split="test")  # the kernel released the lock: nothing to clear
    assert not list(store.glob(".*.tmp"))
    assert FeatureStore(store).manifest()["complete"] and len(FeatureStore(store).load("images")) == 4


# 4. Shards are reused only when every recorded setting matches.

def test_shards_made_with_other_settings_are_redone_even_without_a_manifest(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    extract(tiny_data, cache, "blip-tiny", split="test")
    store = FeatureStore.at(cache, "toy", "test", "blip-tiny")
    rows_before = np.diff(store.load("images").offsets)
    store.manifest_path.unlink()  # what a user might do after a refusal
    out = extract(tiny_data, cache, "blip-tiny", "--token-pool", 2, split="test").output
    assert "(2 written now)" in out
    assert all(read_shard_attrs(p)["token_pool"] == 2 for p in store.root.glob("*.h5"))
    rows_after = np.diff(store.load("images").offsets)
    assert rows_after[0] < rows_before[0]


# 5. --skip-bad can be undone: a repaired image is read on the next run.

def test_a_repaired_image_is_read_again_and_leaves_the_excluded_list(tiny_data, tmp_path):
    image = tiny_data / "toy" / "images" / "img_0018.jpg"  # test image 2 (10 train, 6 val come first)
    good = image.read_bytes()
    image.write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    extract(tiny_data, cache, "clip-tiny", "--skip-bad", split="test")
    store = FeatureStore.at(cache, "toy", "test", "clip-tiny")
    assert store.bad_images() == [2] and 2 not in store.load("images").ids
    extract(tiny_data, cache, "clip-tiny", "--skip-bad", split="test")  # still bad: re-tried, still excluded
    assert store.bad_images() == [2]
    image.write_bytes(good)
    other = tiny_data / "toy" / "images" / "img_0021.jpg"
    other.write_bytes(b"broken meanwhile")  # the error names this one only, not the repaired one
    out = extract(tiny_data, cache, "clip-tiny", split="test", expect=2).output
    assert "1 image(s) could not be read" in out and "img_0021.jpg" in out and "img_0018.jpg" not in out, out
    other.write_bytes(good)
    out = extract(tiny_data, cache, "clip-tiny", split="test").output  # without --skip-bad: both good now
    assert "0 bad images skipped" in out
    assert store.bad_images() == [] and list(store.load("images").ids) == list(range(8))


# 6. Recall with an excluded image: it and its captions are misses, and nobody else's positives.

def test_the_caption_of_an_excluded_image_is_no_other_images_positive():
    """3 images, image 1 excluded at extraction; its caption scores highest for image 0. Image 0's top caption is
    then another image's: a miss. i2t R@1 is 1 of 3 images (image 2), not 2 of 3."""
    sims = torch.tensor([[0.5, 0.9, 0.1],   # image 0 (rows: the present images 0 and 2; columns: captions 0, 1, 2)
                         [0.1, 0.2, 0.8]])  # image 2
    recall = recall_with_missing(sims, [0, 2], [0, 1, 2], 3)
    assert recall["i2t_r1"] == pytest.approx(100 / 3) and recall["t2i_r1"] == pytest.approx(200 / 3)


def naive_recall(image_embeds, present, text_embeds, t2i, k):
    """Recall@K by the definition, one query at a time: absent images and their captions are misses."""
    n_images = len(set(t2i))
    sims = image_embeds @ text_embeds.T  # present images x captions
    row = {int(i): r for r, i in enumerate(present)}
    i2t = t2i_hits = 0
    for image in range(n_images):
        if image not in row:
            continue
        order = sorted(range(len(t2i)), key=lambda j: (-sims[row[image], j], j))[:k]
        i2t += any(t2i[j] == image for j in order)
    for j, image in enumerate(t2i):
        if image not in row:
            continue
        order = sorted(range(len(present)), key=lambda r: (-sims[r, j], r))[:k]
        t2i_hits += row[image] in order
    return 100 * i2t / n_images, 100 * t2i_hits / len(t2i)


def test_score_counts_an_excluded_image_and_its_captions_as_misses(tiny_data, tmp_path):
    """The image whose caption ranks first for another test image is excluded: that image is then an i2t miss at
    R@1 (the old placeholder made the excluded image's captions image 0's positives, and got this wrong)."""
    extract(tiny_data, tmp_path / "clean", "clip-tiny", split="test")
    store = FeatureStore.at(tmp_path / "clean", "toy", "test", "clip-tiny")
    t2i = SplitIndex.load(index_path(tmp_path / "clean", "toy", "test")).text_to_image.tolist()
    tops = [t2i[j] for j in np.argmax(store.load("images").embeds @ store.load("texts").embeds.T, axis=1)]
    excluded = next(j for i, j in enumerate(tops) if j != i)  # the generated data have one
    (tiny_data / "toy" / "images" / f"img_{16 + excluded:04d}.jpg").write_bytes(b"broken")
    cache = tmp_path / "cache"
    extract(tiny_data, cache, "clip-tiny", "--skip-bad", split="test")
    score_json = tmp_path / "s.json"
    run_cli("score", "--dataset", "toy", "--cache", cache, "--runs", tmp_path / "runs", "--json", score_json)
    row = json.loads(score_json.read_text())["rows"][0]
    store = FeatureStore.at(cache, "toy", "test", "clip-tiny")
    images, texts = store.load("images"), store.load("texts")
    assert excluded not in images.ids
    for k in (1, 5):
        i2t, t2i_recall = naive_recall(images.embeds.astype(np.float64), images.ids, texts.embeds.astype(np.float64),
                                       t2i, k)
        assert row[f"i2t_r{k}"] == pytest.approx(i2t) and row[f"t2i_r{k}"] == pytest.approx(t2i_recall)


# 8. --rerank reads only the clean views, block by block within --memory-gb.

def test_rerank_encodes_the_train_split_clean_views_in_blocks(work, monkeypatch, caplog):
    loads = []
    real_load = FeatureStore.load

    def recording_load(self, kind, *args, **kwargs):
        data = real_load(self, kind, *args, **kwargs)
        loads.append((self.root, kind, data))
        return data

    monkeypatch.setattr(FeatureStore, "load", recording_load)
    budget = 2e-5  # GB: a few images' node features per block
    with caplog.at_level(logging.INFO, logger="pipeline"):
        out = score(work, "--run", "r", "--rerank", "--memory-gb", budget).output
    assert "hada+rerank" in out
    train_images = [d for root, kind, d in loads if kind == "images" and "train" in root.parts and d.tokens is not None
                    and len(d.tokens)]
    assert len(train_images) > 2 and max(len(d) for d in train_images) < 24  # several blocks, none the whole split
    assert all(d.view is None or not d.view.any() for d in train_images)  # no augmented view was read
    assert any("blocks of" in r.message for r in caplog.records)


def test_encoding_in_blocks_gives_the_embeddings_of_one_pass(work):
    from fuse.run import encode_run

    whole = encode_run(work / "runs" / "r", "test", work / "cache", "cpu", memory_gb=100)
    one_pass = {kind: FeatureStore(whole).load(kind, tokens=False).embeds for kind in ("images", "texts")}
    shutil.rmtree(whole)
    encode_run(work / "runs" / "r", "test", work / "cache", "cpu", memory_gb=1e-6)
    for kind in ("images", "texts"):
        np.testing.assert_allclose(FeatureStore(whole).load(kind, tokens=False).embeds, one_pass[kind], atol=1e-6)


# 9. A resumed run keeps the memory budget it was trained with.

def test_a_resume_without_memory_gb_keeps_the_saved_budget(work, monkeypatch, caplog):
    config = json.loads((work / "runs" / "r" / "config.json").read_text())
    saved = config["config"]["memory_gb"]
    assert isinstance(saved, float) and saved > 0  # resolved when the run started
    monkeypatch.setattr("fuse.data.available_memory", lambda: 1000)  # the default budget would now stream
    with caplog.at_level(logging.INFO, logger="pipeline"):
        fuse(work, "--run", "r", "--resume", "--epochs", 2)
    said = " ".join(r.message for r in caplog.records)
    assert "keeping the saved run's" in said and f"--memory-gb {saved!r}" in said and "streaming" not in said
    assert json.loads((work / "runs" / "r" / "config.json").read_text())["config"]["memory_gb"] == saved


# 10. A store whose first image shard holds no rows still knows its widths.

def test_dims_come_from_a_shard_that_has_rows(tiny_data, tmp_path):
    for k in (16, 17):  # test images 0 and 1: the whole first shard
        (tiny_data / "toy" / "images" / f"img_{k:04d}.jpg").write_bytes(b"broken")
    cache = tmp_path / "cache"
    extract(tiny_data, cache, "blip-tiny", "--skip-bad", "--shard-size", 2, split="test")
    store = FeatureStore.at(cache, "toy", "test", "blip-tiny")
    with h5py.File(store.root / "images-00000.h5", "r") as f:
        assert len(f["ids"]) == 0
    settings = store.settings()
    assert store.dims("images") == (settings["image_token_dim"], settings["embed_dim"])


# 11. Options that would be ignored are refused by name; the non-finite-loss message says what works.

def test_a_second_encoder_of_a_fused_split_is_refused_before_it_encodes(work, monkeypatch):
    from data.lock import exclusive

    shutil.rmtree(work / "runs" / "r" / "embeds" / "test")
    monkeypatch.setattr("fuse.run.encode_stores", lambda *a, **k: pytest.fail("encoded although refused"))
    with exclusive(work / "runs" / "r" / "embeds" / "test", "held", "-"):
        out = score(work, "--run", "r", expect=2).output
    assert "is being written by another process" in out and "it is encoding test through run r" in out, out
    assert "--cache" not in out.split("process")[1]


def test_options_that_would_be_ignored_are_refused(trained, tiny_data, tmp_path):
    assert "No such option '--data-root'" in fuse(trained, "--data-root", "x", expect=2).output
    out = fuse(trained, "--init-momentum", "--run", "x", expect=2).output
    assert "--init-momentum" in out and "--init RUN" in out
    out = extract(tiny_data, tmp_path / "c", "clip-tiny", "--address", "tcp://127.0.0.1:1", split="test",
                  expect=2).output
    assert "--address tcp://127.0.0.1:1 is for --scheduler distributed" in out
    out = extract(tiny_data, tmp_path / "c", "clip-tiny", "--token-pool", 2, split="test", expect=2).output
    assert "--token-pool 2: clip-tiny stores no patch-token grid" in out
    out = extract(tiny_data, tmp_path / "c", "clip-tiny", "--captions-per-image", 5, split="train", expect=2).output
    assert "--captions-per-image 5 applies to the scored splits" in out
    assert not (tmp_path / "c" / "toy" / "test" / "clip-tiny").exists()


def test_a_non_finite_loss_says_what_the_user_can_do(work):
    out = fuse(work, "--backbones", ",".join(BACKBONES), "--run", "hot", "--lr", 1e30, expect=2).output
    assert "non-finite loss in epoch 1 of run hot" in out, out
    assert "--resume keeps" not in out and "A resumed run keeps its --lr, so train a new run" in out
    assert "--run hot-lr2.5e+29 --lr 2.5e+29" in out


# 12. Non-finite features are refused at extraction, naming the captions.

def test_non_finite_features_are_refused_naming_the_captions(tiny_data, tmp_path, monkeypatch):
    from extract.backbones.clip import Clip

    real = Clip.encode_texts

    def overflowing(self, inputs):
        enc = real(self, inputs)
        enc.tokens[0] = 1e6  # beyond float16's range once stored
        return enc

    monkeypatch.setattr(Clip, "encode_texts", overflowing)
    out = extract(tiny_data, tmp_path / "c", "clip-tiny", "--batch-size", 64, split="test", expect=2).output
    index = SplitIndex.load(index_path(tmp_path / "c", "toy", "test"))
    assert "non-finite features" in out and f"caption 0 {index.captions[0]!r}" in out, out
    assert not list((tmp_path / "c" / "toy" / "test" / "clip-tiny").glob("texts-*.h5"))


# 13. Writes are flushed to disk; a manifest cut off by a crash is named, not a traceback.

def test_atomic_writes_flush_the_file_and_its_folder(tmp_path, monkeypatch):
    from data import atomic

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    atomic.write_json(tmp_path / "manifest.json", {"a": 1})
    assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


def test_an_empty_manifest_is_named(work):
    (work / "cache" / "toy" / "test" / "clip-tiny" / "manifest.json").write_text("")
    out = score(work, "--run", "r", expect=2).output
    assert "manifest.json is empty" in out and "Traceback" not in out


# --resume without --run

def test_resume_without_run_continues_the_default_run_or_names_the_runs(work):
    out = fuse(work, "--resume", expect=2).output
    assert "no run toy-blip-tiny+clip-tiny" in out and "runs that can be resumed: r" in out, out
    fuse(work)  # the default run, toy-blip-tiny+clip-tiny
    fuse(work, "--resume", "--epochs", 2)
    history = json.loads((work / "runs" / "toy-blip-tiny+clip-tiny" / "config.json").read_text())
    assert history["backbones"] == list(BACKBONES)
    metrics = (work / "runs" / "toy-blip-tiny+clip-tiny" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
