"""Recall@K curves (K = 1..50) for both directions, one line per method, as a PNG.

Optionally two more rows of panels: the COCO 1K curves (the five folds' mean) and bars of the corrected-positive
metrics (ECCV Caption, CxC, PMRP) of every method that has them.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data.atomic import atomic_path

from .table import CORRECTED

PANELS = (("i2t", "image \u2192 text"), ("t2i", "text \u2192 image"))


def _curves(axes, curves: Mapping[str, Mapping[str, Sequence[float]]], what: str) -> None:
    for ax, (key, label) in zip(axes, PANELS):
        for method, curve in curves.items():
            y = np.asarray(curve[key], dtype=float)
            ax.plot(np.arange(1, y.size + 1), y, label=method)
        ax.set(title=f"{label}{what}", xlabel="K", xscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].legend(loc="lower right", fontsize="small")


def _bars(axes, corrected: Mapping[str, Mapping[str, Any]]) -> None:
    keys = [(k, name) for k, name in CORRECTED if any(k in m for m in corrected.values())]
    width = 0.8 / max(len(corrected), 1)
    for ax, (key, label) in zip(axes, PANELS):
        for n, (method, metrics) in enumerate(corrected.items()):
            y = [100 * metrics[k][key] if k in metrics else np.nan for k, _ in keys]
            ax.bar(np.arange(len(keys)) + n * width, y, width, label=method)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [name for _, name in keys], fontsize="small")
        ax.set(title=f"{label}: corrected positives (ECCV Caption, CxC, PMRP)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("percent")
    axes[0].legend(loc="upper right", fontsize="small")


def plot_recall_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                       title: str | None = None, curves_1k: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                       corrected: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """curves: {method: {"i2t": recall@1..K, "t2i": recall@1..K}} in percent (see recall.recall_curve).

    curves_1k: the same for COCO 1K (a second row); corrected: {method: its ``eccv`` dict} (a row of bars).
    Drawn on a bare Agg figure (no pyplot, so no global backend state) and written atomically.
    """
    extra = [panel for panel, on in (("1k", curves_1k), ("corrected", corrected)) if on]
    fig = Figure(figsize=(10, 4 * (1 + len(extra))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1 + len(extra), 2, sharey="row", squeeze=False)
    _curves(axes[0], curves, "")
    for row, panel in zip(axes[1:], extra):
        if panel == "1k":
            _curves(row, curves_1k, " (COCO 1K, mean of 5 folds)")
        else:
            _bars(row, corrected)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
