"""The real `pipeline` command, as a user runs it: extract -> fuse -> score on a generated dataset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_extract_fuse_score(tmp_path):
    from data.demo import generate_demo

    generate_demo(tmp_path / "datasets", n_train=120, n_val=30, n_test=30, image_size=64)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def pipeline(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    for backbone in ("blip-tiny", "clip-tiny"):
        for split in ("train", "val", "test"):
            pipeline("extract", "--backbone", backbone, "--dataset", "demo", "--split", split, "--workers", 1)
    pipeline("fuse", "--dataset", "demo", "--backbones", "blip-tiny,clip-tiny", "--epochs", 2, "--width", 64,
             "--embed-dim", 64, "--queue-size", 256)
    out = pipeline("score", "--dataset", "demo", "--json", "scores.json", "--plot", "recall.png")
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["run"] == "demo-blip-tiny+clip-tiny" and doc["split"] == "test"
    assert [r["method"] for r in doc["rows"]] == ["blip-tiny", "clip-tiny", "late-fusion", "hada"]
    assert all(0 <= r[k] <= 100 for r in doc["rows"] for k in r if k not in ("method", "rsum"))
    assert "hada" in out and (tmp_path / "recall.png").is_file() and (tmp_path / "scores.md").is_file()
