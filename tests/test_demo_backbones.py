"""The demo's trained backbones: seeded training on one view each, weights read back through --checkpoint, and
the method's value on them (hada above each backbone alone)."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from test_fuse_train import chance_rsum

from conftest import TINY_FUSE, run_cli
from data.demo import generate_demo
from data.store import ShardData, read_shard_attrs, write_shard
from extract.backbones import BackboneOptions, create
from extract.backbones.demo_training import TRAINING_RECORD, demo_weights, weights_folder


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_backbones") / "datasets"
    generate_demo(root, n_train=80, n_val=20, n_test=20, image_size=64)
    return root


@pytest.mark.parametrize("name", ["blip-demo", "clip-demo"])
def test_training_is_seeded_reused_and_read_back_through_checkpoint(small_demo, tmp_path, one_thread, name):
    a = demo_weights(name, small_demo, tmp_path / "a", steps=3)
    b = demo_weights(name, small_demo, tmp_path / "b", steps=3)
    record = json.loads((a / TRAINING_RECORD).read_text())
    assert record["recipe"]["steps"] == 3 and record["backbone"] == name
    stamp = (a / TRAINING_RECORD).stat().st_mtime_ns
    assert demo_weights(name, small_demo, a, steps=3) == a and (a / TRAINING_RECORD).stat().st_mtime_ns == stamp

    trained, again = create(name, BackboneOptions(checkpoint=str(a))), create(name, BackboneOptions(checkpoint=str(b)))
    fresh = create(name.replace("-demo", "-tiny"))
    state, same, initial = trained.module.state_dict(), again.module.state_dict(), fresh.module.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)  # deterministic
    assert any(not torch.equal(state[k], initial[k]) for k in state)  # trained away from the initialisation
    pixels = torch.randn(2, 3, trained.image_size, trained.image_size)
    with torch.inference_mode():
        assert not torch.allclose(trained.encode_images(pixels).proj, fresh.encode_images(pixels).proj)
    assert trained.describe()["checkpoint"] == str(a)


@pytest.mark.parametrize("name", ["blip-demo", "clip-demo"])
def test_demo_backbones_need_their_weights(tiny_data, small_demo, tmp_path, name):
    out = run_cli("extract", "--backbone", name, "--dataset", "toy", "--data-root", tiny_data, "--cache", tmp_path,
                  expect=2).output
    assert f"{name} needs the weights `pipeline demo` trains" in out
    assert f"<cache>/demo-weights/{name}-<hash>/" in out and f"{name}@<that folder>" in out and "--checkpoint" in out
    folder = weights_folder(tmp_path, name, small_demo)  # where the message says `pipeline demo` writes them
    assert folder.parent == tmp_path / "demo-weights" and folder.name.startswith(f"{name}-")


def shuffle_image_features(store_root, seed: int = 0) -> None:
    """Give every image of a store another image's features (ids kept): that backbone then says nothing true."""
    for path in sorted(store_root.glob("images-*.h5")):
        attrs = read_shard_attrs(path)
        with h5py.File(path) as f:
            d = {k: f[k][:] for k in f}
        perm = np.random.default_rng(seed).permutation(len(d["ids"]))
        counts = np.diff(d["offsets"])[perm]
        tokens = np.concatenate([d["tokens"][a:a + n] for a, n in zip(d["offsets"][perm], counts)])
        write_shard(path, ShardData(ids=d["ids"], embeds=d["embeds"][perm], norms=d["norms"][perm],
                                    offsets=np.concatenate([[0], np.cumsum(counts)]), tokens=tokens), attrs)


def test_hada_beats_each_complementary_trained_backbone_and_uses_both(tmp_path, one_thread):
    """The method's value at test scale: two backbones each trained on one half of the scene, hada above both,
    and worse when either backbone's test images are given other images' features (so it uses both)."""
    root, cache, runs = tmp_path / "datasets", tmp_path / "cache", tmp_path / "runs"
    generate_demo(root, n_train=300, n_val=60, n_test=60, image_size=64)
    for name in ("blip-demo", "clip-demo"):
        weights = demo_weights(name, root, tmp_path / "weights" / name, steps=200)
        for split in ("train", "val", "test"):
            run_cli("extract", "--backbone", name, "--checkpoint", weights, "--dataset", "demo", "--split", split,
                    "--data-root", root, "--cache", cache, "--workers", 0, "--batch-size", 128)
    run_cli("fuse", "--dataset", "demo", "--backbones", "blip-demo,clip-demo", "--cache", cache, "--runs", runs,
            "--run", "r", "--epochs", 8, *TINY_FUSE)

    def score(features) -> dict:
        shutil.rmtree(runs / "r" / "embeds" / "test", ignore_errors=True)  # re-encode the test split from `features`
        run_cli("score", "--dataset", "demo", "--cache", features, "--runs", runs, "--run", "r", "--json",
                tmp_path / "s.json")
        return {r["method"]: r["rsum"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]}

    rsum = score(cache)
    assert rsum["blip-demo"] > 2 * chance_rsum(60) and rsum["clip-demo"] > 1.3 * chance_rsum(60), rsum
    assert rsum["hada"] > 1.05 * max(rsum["blip-demo"], rsum["clip-demo"]), rsum
    for name in ("blip-demo", "clip-demo"):
        shuffled = tmp_path / f"without-{name}"
        shutil.copytree(cache, shuffled)
        shuffle_image_features(shuffled / "demo" / "test" / name)
        assert score(shuffled)["hada"] < 0.95 * rsum["hada"], (name, rsum)
