"""The score table: rows of {method, recall keys} as aligned text, markdown, and a JSON + markdown file pair.

Beside the recall table: the COCO 1K table (same columns) and the corrected-positives table (ECCV Caption, CxC,
PMRP from each row's ``eccv`` dict, which holds the eccv_caption package's fractions; shown in percent).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from data.atomic import write_json, write_text

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
HEADERS = ("method", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rsum")
# eccv_caption's keys and their column names; PMRP only when a row has it.
CORRECTED = (("eccv_map_at_r", "ECCV mAP@R"), ("eccv_rprecision", "ECCV R-P"), ("eccv_r1", "ECCV R@1"),
             ("cxc_r1", "CxC R@1"), ("pmrp", "PMRP"))
COCO_1K_TITLE = "COCO 1K: five folds of 1,000 test images and their captions, each scored alone, averaged"
CORRECTED_TITLE = ("Corrected positives, percent (ECCV Caption: machine-and-human-verified positives; CxC: "
                   "Crisscrossed Captions; PMRP: plausible-match R-precision)")


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    """{method, the seven metric keys} as plain floats (rsum summed when missing), and ``eccv`` when present."""
    out = {"method": str(row["method"])}
    out.update({m: float(row[m]) for m in METRICS[:-1]})
    out["rsum"] = float(row["rsum"]) if "rsum" in row else sum(out[m] for m in METRICS[:-1])
    if "eccv" in row:
        out["eccv"] = row["eccv"]
    return out


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[r["method"]] + [f"{r[m]:.2f}" for m in METRICS] for r in map(_row, rows)]


def corrected_columns(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the corrected-positives table: rows with an ``eccv`` dict, each metric both ways."""
    scored = [r for r in rows if "eccv" in r]
    keys = [(k, name) for k, name in CORRECTED if any(k in r["eccv"] for r in scored)]
    headers = ["method"] + [f"{d} {name}" for k, name in keys for d in ("i2t", "t2i")]
    cells = [[r["method"]] + [f"{100 * r['eccv'][k][d]:.2f}" if k in r["eccv"] else "-" for k, _ in keys
                              for d in ("i2t", "t2i")] for r in scored]
    return headers, cells


def aligned(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Aligned plain text for the screen: first column left-aligned, the others right-aligned."""
    lines = [list(headers)] + [list(c) for c in cells]
    widths = [max(len(line[c]) for line in lines) for c in range(len(headers))]
    fmt = lambda line: "  ".join(  # noqa: E731
        cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(lines[0]), rule] + [fmt(line) for line in lines[1:]]) + "\n"


def markdown(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """GitHub markdown: first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Aligned plain-text recall table for the screen: 2 decimals."""
    return aligned(HEADERS, _cells(rows))


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The same table as GitHub markdown."""
    return markdown(HEADERS, _cells(rows))


def format_tables(rows: Sequence[Mapping[str, Any]], coco_1k: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The recall table for the screen, then the COCO 1K table and the corrected-positives table when present."""
    text = format_table(rows)
    if coco_1k:
        text += f"{COCO_1K_TITLE}\n{format_table(coco_1k)}"
    if any("eccv" in r for r in rows):
        text += f"{CORRECTED_TITLE}\n{aligned(*corrected_columns(rows))}"
    return text


def eccv_by_method(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict] | None:
    """{method: its eccv dict} of the rows that have one (None: no row has)."""
    return {r["method"]: r["eccv"] for r in rows if "eccv" in r} or None


def write_scores(json_path: str | os.PathLike, dataset: str, split: str, run: str,
                 rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> Path:
    """Write {dataset, split, run, rows, **extra} to json_path and the markdown tables beside it (.md, with the
    notes that are sentences under them), atomically.

    ``extra["coco_1k"]`` (rows like ``rows``) becomes a second table; rows' ``eccv`` dicts a third.
    """
    json_path = Path(json_path)
    doc = {"dataset": dataset, "split": split, "run": run, "rows": [_row(r) for r in rows]}
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"extra key {key!r} would overwrite a fixed key")
        doc[key] = [_row(r) for r in value] if key == "coco_1k" else value
    write_json(json_path, doc)
    notes = doc.get("notes") if isinstance(doc.get("notes"), dict) else {}
    notes = {k: v for k, v in notes.items() if isinstance(v, str)}  # the caveats, under the tables
    text = f"# {dataset} {split}: {run}\n\n" + format_markdown(rows)
    if "coco_1k" in doc:
        text += f"\n## {COCO_1K_TITLE}\n\n" + format_markdown(doc["coco_1k"])
    if any("eccv" in r for r in rows):
        text += f"\n## {CORRECTED_TITLE}\n\n" + markdown(*corrected_columns(rows))
    write_text(json_path.with_suffix(".md"), text + "".join(f"\n{key}: {note}\n" for key, note in notes.items()))
    return json_path
