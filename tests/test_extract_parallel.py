"""Extraction in parallel: decoding threads, the threads scheduler, and a real dask scheduler + worker."""
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.store import FeatureStore
from tests.test_extract import extract, load  # noqa: I001

ROOT = Path(__file__).resolve().parents[1]


def hada_view(magnitude):
    """A training view as the backbones make it (crop, flip, RandomAugment, then to a normalised tensor)."""
    from torchvision import transforms as T

    from extract.augment import TrainView

    return TrainView(32, magnitude, T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]))


def test_augmentation_draws_only_from_its_generator():
    import random

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    aug = hada_view(7)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    a = aug(image, np.random.default_rng(5))
    torch.manual_seed(1), np.random.seed(1), random.seed(1)  # other global states: same view
    b = aug(image, np.random.default_rng(5))
    c = aug(image, np.random.default_rng(6))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augmented_views_are_the_same_from_any_thread():
    """Eight threads augmenting while another reseeds the global generator give the sequential result."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(16)]
    aug = hada_view(5)
    ref = [aug(im, np.random.default_rng(k)) for k, im in enumerate(images)]
    out, stop = [None] * len(images), threading.Event()

    def noise():
        while not stop.is_set():
            seed = int(time.perf_counter_ns() % 1000)
            torch.manual_seed(seed)
            np.random.seed(seed)

    def work(k):
        out[k] = aug(images[k], np.random.default_rng(k))

    threads = [threading.Thread(target=noise)] + [threading.Thread(target=work, args=(k,)) for k in range(len(images))]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert all(torch.equal(a, b) for a, b in zip(ref, out))


def test_decoding_threads_give_the_batches_of_one_thread(tiny_data):
    from extract.backbones import create
    from extract.reader import ImageRows, image_batches

    b = create("clip-tiny")
    paths = sorted((tiny_data / "toy" / "images").glob("*.jpg"))[:7] + [tiny_data / "missing.jpg"]
    reader = ImageRows(paths, list(range(8)), 1, b.eval_transform(), b.train_transform(), seed=3)
    one = list(image_batches(reader, 3, 0))
    many = list(image_batches(reader, 3, 4))
    assert len(one) == len(many) == 6  # 16 items (8 images x 2 views), 3 per batch
    for (ids, views, px, bad), (ids2, views2, px2, bad2) in zip(one, many):
        assert torch.equal(ids, ids2) and torch.equal(views, views2) and bad == bad2
        assert (px is None and px2 is None) or torch.equal(px, px2)
    assert one[-1][2] is None  # the last batch holds only the missing image's view
    assert [r for batch in one for r, _ in batch[3]] == [7, 7]  # the missing file, named in both views


def test_clip_patch_tokens_match_open_clip_and_leave_the_module_alone():
    from extract.backbones import BackboneOptions, create

    b = create("clip-tiny", BackboneOptions(tokens=True))
    px = torch.randn(2, 3, 32, 32)
    visual = b.module.visual
    with torch.inference_mode():
        enc = b.encode_images(px)
        visual.output_tokens = True
        pooled, patches = visual(px)
        visual.output_tokens = False
    assert torch.equal(enc.proj, pooled) and torch.equal(enc.tokens[:, 1:], patches @ visual.proj)
    assert enc.tokens.shape == (2, 1 + 16, 24) and visual.output_tokens is False


def test_threads_scheduler_with_views_and_clip_tokens_matches_sync(tiny_data, tmp_path):
    args = ("--backbone", "clip-tiny", "--split", "train", "--views", 2, "--clip-tokens", "--shard-size", 2,
            "--batch-size", 2)
    extract(tiny_data, tmp_path / "sync", *args)
    extract(tiny_data, tmp_path / "threads", *args, "--scheduler", "threads", "--workers", 2)
    ref, ref_txt = load(tmp_path / "sync", "clip-tiny", "train")
    img, txt = load(tmp_path / "threads", "clip-tiny", "train")
    assert sorted(set(ref.view)) == [0, 1, 2] and np.diff(ref.offsets)[0] == 17  # global node + 4x4 patches
    for a, b in ((ref, img), (ref_txt, txt)):
        for field in ("ids", "view", "embeds", "offsets", "tokens"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_schedulers_in_process_write_the_same_features(tiny_data, tmp_path):
    from distributed import LocalCluster

    extract(tiny_data, tmp_path / "sync", "--backbone", "clip-tiny", "--shard-size", 3)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        extract(tiny_data, tmp_path / "dist", "--backbone", "clip-tiny", "--shard-size", 3,
                "--scheduler", "distributed", "--address", cluster.scheduler_address)
    ref_img, ref_txt = load(tmp_path / "sync", "clip-tiny")
    img, txt = load(tmp_path / "dist", "clip-tiny")
    np.testing.assert_array_equal(ref_img.embeds, img.embeds)
    np.testing.assert_array_equal(ref_txt.tokens, txt.tokens)
    out = extract(tiny_data, tmp_path / "x", "--backbone", "clip-tiny", "--scheduler", "distributed", expect=2).output
    assert "--address" in out


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_readme_recipe_on_a_dask_scheduler_and_worker_started_as_processes(tiny_data, tmp_path):
    """`dask scheduler` + `dask worker ADDRESS --nthreads 1` on loopback (the worker runs in a daemonic process):
    extraction with decoding threads gives the local run's features."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "DASK_DISTRIBUTED__WORKER__DAEMON": "True"}
    bin_dir = Path(sys.executable).parent
    dask = [str(bin_dir / "dask")] if (bin_dir / "dask").is_file() else [sys.executable, "-m", "dask"]
    files = tmp_path / "dask"
    files.mkdir()
    scheduler = start([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                       "--scheduler-file", str(files / "scheduler.json")], files / "scheduler.log", env)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not (files / "scheduler.json").is_file():
            assert time.monotonic() < deadline and scheduler.poll() is None, (files / "scheduler.log").read_text()
            time.sleep(0.2)
        time.sleep(0.5)  # the file is written once the scheduler listens; let the write finish
        address = re.search(r'"address": "([^"]+)"', (files / "scheduler.json").read_text()).group(1)
        worker = start([*dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--local-directory",
                        str(files)], files / "worker.log", env)
        args = ("--backbone", "blip-tiny", "--split", "train", "--views", 1, "--shard-size", 4, "--workers", 2)
        extract(tiny_data, tmp_path / "local", *args)
        extract(tiny_data, tmp_path / "remote", *args, "--scheduler", "distributed", "--address", address)
        log = (files / "worker.log").read_text()
        assert "Starting Worker" in log and "daemonic" not in log, log[-3000:]
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                stop(proc)
    ref, ref_txt = load(tmp_path / "local", "blip-tiny", "train")
    img, txt = load(tmp_path / "remote", "blip-tiny", "train")
    for a, b in ((ref, img), (ref_txt, txt)):
        for field in ("ids", "embeds", "tokens"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert FeatureStore.at(tmp_path / "remote", "toy", "train", "blip-tiny").manifest()["complete"]
