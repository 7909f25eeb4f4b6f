"""Score table, the JSON + markdown pair, and the recall-curve PNG."""
import json

import numpy as np

from evaluate.plot import plot_recall_curves
from evaluate.table import corrected_columns, eccv_by_method, format_markdown, format_table, format_tables, write_scores

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


def eccv_dict(x, pmrp=False):
    out = {k: {"i2t": x, "t2i": x / 2} for k in ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_r1", "cxc_r5",
                                                 "coco_5k_r1")}
    return {**out, "pmrp": {"i2t": 0.25, "t2i": 0.5}} if pmrp else out


def test_coco_1k_and_corrected_positive_tables(tmp_path):
    rows = [{**ROWS[0], "eccv": eccv_dict(0.4)}, {**ROWS[1], "eccv": eccv_dict(0.3, pmrp=True)},
            {**ROWS[0], "method": "no-eccv"}]
    headers, cells = corrected_columns(rows)
    assert headers[:3] == ["method", "i2t ECCV mAP@R", "t2i ECCV mAP@R"] and headers[-1] == "t2i PMRP"
    assert len(headers) == 11 and [c[0] for c in cells] == ["blip", "late fusion (0.7/0.3)"]  # no-eccv: no row
    assert cells[0][1:3] == ["40.00", "20.00"] and cells[0][-2:] == ["-", "-"] and cells[1][-1] == "50.00"
    text = format_tables(rows, coco_1k=ROWS)
    assert "COCO 1K" in text and "Corrected positives" in text and text.count("late fusion (0.7/0.3)") == 3
    assert format_tables(ROWS) == format_table(ROWS)
    assert eccv_by_method(rows) == {"blip": rows[0]["eccv"], "late fusion (0.7/0.3)": rows[1]["eccv"]}
    assert eccv_by_method(ROWS) is None

    path = tmp_path / "s.json"
    write_scores(path, "coco", "test", "r", rows, extra={"coco_1k": ROWS})
    doc = json.loads(path.read_text())
    assert doc["rows"][0]["eccv"] == rows[0]["eccv"] and [list(r) for r in doc["coco_1k"]] == [KEYS, KEYS]
    md = path.with_suffix(".md").read_text()
    assert "## COCO 1K" in md and "## Corrected positives" in md and md.count("\n|") == 5 + 4 + 4

    plot_recall_curves({"a": {"i2t": [50, 60], "t2i": [40, 45]}}, tmp_path / "p.png", "t",
                       curves_1k={"a": {"i2t": [70, 80], "t2i": [60, 65]}}, corrected=eccv_by_method(rows))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
