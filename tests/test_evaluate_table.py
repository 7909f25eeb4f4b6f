"""Score table, the JSON + markdown pair, and the recall-curve PNG."""
import json

import numpy as np

from evaluate.plot import plot_recall_curves
from evaluate.table import format_markdown, format_table, write_scores

ROWS = [
    {"method": "blip", "i2t_r1": 80.123, "i2t_r5": 95.0, "i2t_r10": 97.5, "t2i_r1": 63.1, "t2i_r5": 85.25,
     "t2i_r10": 91.0, "rsum": 511.973, "extra_metric": 1.0},
    {"method": "late fusion (0.7/0.3)", "i2t_r1": 81, "i2t_r5": 95.5, "i2t_r10": 98, "t2i_r1": 64,
     "t2i_r5": 86, "t2i_r10": 92},
]
KEYS = ["method", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


def test_format_table_aligned():
    text = format_table(ROWS)
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split()[:3] == ["method", "i2t", "R@1"]
    assert "80.12" in lines[2] and lines[2].endswith("511.97") and lines[3].endswith("516.50")


def test_format_markdown():
    lines = format_markdown(ROWS).splitlines()
    assert len(lines) == 4 and all(line.startswith("|") and line.count("|") == 9 for line in lines)
    assert "| late fusion (0.7/0.3) | 81.00 |" in lines[3]


def test_write_scores(tmp_path):
    path = tmp_path / "scores" / "coco_test.json"
    write_scores(path, "coco", "test", "run1", ROWS, extra={"notes": "weights tuned on val"})
    doc = json.loads(path.read_text())
    assert list(doc) == ["dataset", "split", "run", "rows", "notes"]
    assert (doc["dataset"], doc["split"], doc["run"]) == ("coco", "test", "run1")
    assert [list(r) for r in doc["rows"]] == [KEYS, KEYS]
    assert doc["rows"][1]["rsum"] == 516.5
    assert path.with_suffix(".md").read_text().count("\n|") == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["coco_test.json", "coco_test.md"]


def test_plot_png(tmp_path):
    k = np.arange(1, 51)
    curves = {"a": {"i2t": 100 * (1 - 0.5 ** k), "t2i": 100 * (1 - 0.6 ** k)},
              "b": {"i2t": np.minimum(100, 40 + k), "t2i": np.minimum(100, 30 + k)}}
    path = tmp_path / "curves.png"
    plot_recall_curves(curves, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
