"""The score table: rows of {method, recall keys} as aligned text, markdown, and a JSON + markdown file pair."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from data.atomic import write_json, write_text

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
HEADERS = ("method", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rsum")


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    """{method, the seven metric keys} as plain floats; rsum is summed when missing."""
    out = {"method": str(row["method"])}
    out.update({m: float(row[m]) for m in METRICS[:-1]})
    out["rsum"] = float(row["rsum"]) if "rsum" in row else sum(out[m] for m in METRICS[:-1])
    return out


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[r["method"]] + [f"{r[m]:.2f}" for m in METRICS] for r in map(_row, rows)]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Aligned plain-text table for the screen: method left-aligned, numbers right-aligned, 2 decimals."""
    lines = [list(HEADERS)] + _cells(rows)
    widths = [max(len(line[c]) for line in lines) for c in range(len(HEADERS))]
    fmt = lambda line: "  ".join(  # noqa: E731
        cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(lines[0]), rule] + [fmt(line) for line in lines[1:]]) + "\n"


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|---" + "|---:" * len(METRICS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(rows)]
    return "\n".join(lines) + "\n"


def write_scores(json_path: str | os.PathLike, dataset: str, split: str, run: str,
                 rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> Path:
    """Write {dataset, split, run, rows, **extra} to json_path and the markdown table beside it (.md, with the
    notes that are sentences under it), atomically."""
    json_path = Path(json_path)
    doc = {"dataset": dataset, "split": split, "run": run, "rows": [_row(r) for r in rows]}
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"extra key {key!r} would overwrite a fixed key")
        doc[key] = value
    write_json(json_path, doc)
    notes = doc.get("notes") if isinstance(doc.get("notes"), dict) else {}
    notes = {k: v for k, v in notes.items() if isinstance(v, str)}  # the caveats, under the table
    write_text(json_path.with_suffix(".md"), f"# {dataset} {split}: {run}\n\n" + format_markdown(rows)
               + "".join(f"\n{key}: {note}\n" for key, note in notes.items()))
    return json_path
