"""Three backbones in one run on demo data (blip-tiny, clip-tiny, blip2-tiny): the score table has every row."""
import json
import shutil

import pytest
from test_fuse_train import chance_rsum

from conftest import TINY_FUSE, run_cli


@pytest.mark.slow
def test_blip_clip_and_blip2_fused_in_one_run(demo_cache, tmp_path, one_thread):
    data_root, shared = demo_cache
    cache = tmp_path / "cache"
    shutil.copytree(shared, cache)  # the session cache stays as other tests expect it
    for split in ("train", "val", "test"):
        extra = ("--views", 1) if split == "train" else ()
        run_cli("extract", "--backbone", "blip2-tiny", "--dataset", "demo", "--split", split, "--data-root", data_root,
                "--cache", cache, "--workers", 0, "--batch-size", 64, *extra)
    backbones = ["blip-tiny", "clip-tiny", "blip2-tiny"]
    run_cli("fuse", "--dataset", "demo", "--backbones", ",".join(backbones), "--cache", cache,
            "--runs", tmp_path / "runs",
            "--run", "three", "--epochs", 12, *TINY_FUSE)
    out = run_cli("score", "--dataset", "demo", "--cache", cache, "--runs", tmp_path / "runs", "--run", "three",
                  "--json", tmp_path / "scores.json").output
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert [r["method"] for r in doc["rows"]] == [*backbones, "late-fusion", "hada"]
    assert set(doc["notes"]["late_fusion_weights"]) == set(backbones)
    assert doc["rows"][-1]["rsum"] > 1.5 * chance_rsum(60), doc["rows"][-1]
    assert "blip2-tiny" in out
