"""The real `pipeline` command, as a new user runs it: the design card's sequence in a fresh folder."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_karpathy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_design_card_sequence_in_a_fresh_folder(tmp_path):
    """A folder whose datasets/ holds COCO: `extract --backbone a`, `extract --backbone b`, `fuse --epochs 2`,
    `score --dataset coco`, with nothing else on the command lines; output piped, so no progress bars."""
    write_karpathy(tmp_path / "datasets", "coco", {"train": 48, "val": 16, "test": 16})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def pipeline(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, timeout=600)
        stderr = proc.stderr.decode()  # not text=True, which would turn a bar's \r into \n
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "Warning" not in stderr, stderr[-3000:]
        assert "\r" not in stderr and "%|" not in stderr, stderr[-3000:]
        return proc.stdout.decode()

    for backbone in ("blip-tiny", "clip-tiny"):
        out = pipeline("extract", "--backbone", backbone)
        assert re.findall(r"^cache/coco/(\w+)/", out, re.M) == ["train", "val", "test"]
    out = pipeline("fuse", "--epochs", 2)
    assert out.startswith("runs/coco-blip-tiny+clip-tiny: 2 epochs") and "val, test" in out
    table = pipeline("score", "--dataset", "coco")
    methods = [line.split()[0] for line in table.splitlines()[2:6]]
    assert methods == ["blip-tiny", "clip-tiny", "late-fusion", "hada"], table
    assert "late_fusion_weights" in table and "random_init" in table


@pytest.mark.slow
def test_the_demo_says_why_it_trains_on_clean_images_instead_of_warning(tmp_path):
    """A newcomer's first run should not warn about itself: the demo's fuse step says why it has no views."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "demo", "--backbones", "blip-tiny,clip-tiny",
                           "--epochs", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fuse blip-tiny + clip-tiny on clean images (the reference's augmentation flips and recolours" in proc.stdout
    assert "augmented views" not in proc.stderr, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr
