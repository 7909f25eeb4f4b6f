"""Training curves of a run: losses and validation rsum by epoch."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data.atomic import atomic_path  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("loss", "loss_itc", "loss_itm"):
        left.plot(epochs, [row[key] for row in history], marker="o", label=key)
    left.set(xlabel="epoch", ylabel="train loss", title="losses")
    left.legend()
    right.plot(epochs, [row["rsum"] for row in history], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel="rsum (%)", title="validation recall sum")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
