"""Recall@K curves (K = 1..50) for both directions, one line per method, as a PNG."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data.atomic import atomic_path

PANELS = (("i2t", "image \u2192 text"), ("t2i", "text \u2192 image"))


def plot_recall_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike,
                       title: str | None = None) -> None:
    """curves: {method: {"i2t": recall@1..K, "t2i": recall@1..K}} in percent (see recall.recall_curve).

    Drawn on a bare Agg figure (no pyplot, so no global backend state) and written atomically.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, label) in zip(fig.subplots(1, 2, sharey=True), PANELS):
        for method, curve in curves.items():
            y = np.asarray(curve[key], dtype=float)
            ax.plot(np.arange(1, y.size + 1), y, label=method)
        ax.set(title=label, xlabel="K", xscale="log")
        ax.grid(True, which="both", alpha=0.3)
    fig.axes[0].set_ylabel("recall@K (%)")
    fig.axes[0].legend(loc="lower right", fontsize="small")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
