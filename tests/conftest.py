"""Shared fixtures: everything runs on CPU, offline, with tiny models and generated data."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny graphs: the eager attention passes (compiling them would cost more than it saves; tests of the
# compiled passes ask for them by name).
os.environ.setdefault("FUSE_ATTENTION_IMPL", "eager")

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.logs import THIRD_PARTY_NOISE


def pytest_configure(config):
    """Ignore the third-party notices the `pipeline` command ignores (pytest resets filters set at import)."""
    for noise in THIRD_PARTY_NOISE:
        config.addinivalue_line("filterwarnings",
                                f"ignore:{noise['message']}:{noise['category'].__name__}:{noise['module']}")

WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "the", "left", "right", "small", "large",
         "background", "grey", "star", "yellow", "of", "and"]


def make_images(folder: Path, n: int, size: int = 48, seed: int = 0) -> list[str]:
    """Write n small JPEGs (random coloured blocks) and return their names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        pixels = np.kron(rng.integers(0, 255, (4, 4, 3)), np.ones((size // 4, size // 4, 1))).astype(np.uint8)
        name = f"img_{i:04d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


def captions_for(rng, k: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(k)]


def write_karpathy(root: Path, dataset: str, splits: dict[str, int], caps=(5, 7), seed: int = 0) -> Path:
    """A Karpathy split file with 5-7 captions per image plus the images, under root/dataset/."""
    rng = np.random.default_rng(seed)
    names = make_images(root / dataset / "images", sum(splits.values()), seed=seed)
    entries, k = [], 0
    for split, n in splits.items():
        for _ in range(n):
            captions = captions_for(rng, int(rng.integers(caps[0], caps[1] + 1)))
            sents = [{"raw": c, "tokens": c.split()} for c in captions]
            entries.append({"filepath": "", "filename": names[k], "split": split, "sentences": sents, "imgid": k})
            k += 1
    path = root / dataset / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"dataset": dataset, "images": entries}))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend on a shared 2-core machine (10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """data root with a `toy` dataset: 10 train, 6 val, 8 test images, 5-7 captions each."""
    root = tmp_path / "datasets"
    write_karpathy(root, "toy", {"train": 10, "val": 6, "test": 8})
    return root


def run_cli(*args, expect=0):
    """Invoke the `pipeline` CLI in-process; assert the exit code; return the result."""
    from click.testing import CliRunner

    from pipeline import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == expect, result.output
    return result


# Small enough to train in seconds on 2 cores, big enough for the fusion to learn something.
TINY_FUSE = ("--width", 64, "--embed-dim", 64, "--queue-size", 512, "--lr", 1e-3, "--dropout", 0.1,
             "--batch-size", 64)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, cache) of a small demo dataset extracted with both tiny backbones (train with 1 view)."""
    from data.demo import generate_demo

    base = tmp_path_factory.mktemp("demo")
    generate_demo(base / "datasets", n_train=240, n_val=60, n_test=60, image_size=64)
    for backbone in ("blip-tiny", "clip-tiny"):
        for split in ("train", "val", "test"):
            extra = ("--views", 1) if split == "train" else ()
            run_cli("extract", "--backbone", backbone, "--dataset", "demo", "--split", split, "--data-root",
                    base / "datasets", "--cache", base / "cache", "--workers", 0, "--batch-size", 64, *extra)
    return base / "datasets", base / "cache"


@pytest.fixture(scope="session")
def demo_run(demo_cache, tmp_path_factory) -> tuple[Path, Path, str]:
    """(cache, runs, run name) of a fusion run over demo_cache's tiny backbones (3 epochs)."""
    _, cache = demo_cache
    runs = tmp_path_factory.mktemp("demo_runs")
    run_cli("fuse", "--dataset", "demo", "--backbones", "blip-tiny,clip-tiny", "--cache", cache, "--runs", runs,
            "--epochs", 3, "--run", "r", *TINY_FUSE)
    return cache, runs, "r"


@pytest.fixture
def native_calls(monkeypatch):
    """Counts of fuse.native.forward / backward calls (the C++ attention loops), the real ones still run."""
    from fuse import native

    seen = {"forward": 0, "backward": 0}
    for name in seen:
        real = getattr(native, name)

        def spy(*args, _real=real, _name=name):
            seen[_name] += 1
            return _real(*args)
        monkeypatch.setattr(native, name, spy)
    return seen


@pytest.fixture
def native_switch(monkeypatch):
    """fuse.native.set_enabled, with the switch as it was restored after the test."""
    from fuse import native

    monkeypatch.setattr(native, "_enabled", native._enabled)
    return native.set_enabled
