"""QB-Norm and DBNorm rows of one method: its bank passes (each computed once), its settings tuned on val.

A bank pass reads one bank (the train split's image or caption embeddings of the method) block by block against
one gallery (the val or test split's images or captions) and keeps, per gallery item, the log-sum-exp at the
betas needed and QB-Norm's activation sets (on the whole split and, for COCO 1K, within each fold).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from data.progress import Progress

from .bank_norm import (
    ACTIVE_ALL,
    BETA,
    BETAS,
    BankStats,
    bank_block_rows,
    bank_stats,
    dbnorm_i2t,
    dbnorm_t2i,
    qbnorm_i2t,
    qbnorm_t2i,
    tune_dbnorm,
    tune_qbnorm,
)
from .protocols import Part, Scores
from .recall import _rows

log = logging.getLogger("pipeline.score")
METHODS = ("qbnorm", "dbnorm")
OTHER = {"images": "texts", "texts": "images"}


@dataclass
class Side:
    """One split's embeddings of one method: present images, all captions (local caption targets for val)."""

    images: Any
    texts: Any
    text_to_image: np.ndarray | None = None


def _pick(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


class BankRows:
    """QB-Norm and DBNorm scores of one method on the test split, with their banks from the train split.

    test: the method's test embeddings; bank: its train embeddings; val: its val embeddings (None: the default
    settings, BETA); folds: for COCO 1K, each fold's (present image rows, caption rows) of the test split.
    """

    def __init__(self, name: str, test: Side, bank: Side, val: Side | None, methods: Sequence[str],
                 folds: list[tuple[np.ndarray, np.ndarray]] | None = None, memory_bytes: int = 2 << 30,
                 device: str | torch.device = "cpu"):
        self.name, self.test, self.bank, self.val = name, test, bank, val
        self.methods, self.folds, self.memory, self.device = tuple(methods), folds, memory_bytes, device
        self.settings: dict[str, Any] = {}
        self._test_stats: dict[tuple[str, str], BankStats] = {}

    def _pass(self, split: str, gallery: Any, side: str, bank_side: str, betas: Sequence[float],
              partitions: dict | None = None) -> BankStats:
        bank = getattr(self.bank, bank_side)
        what = f"{self.name}: {split} {side} vs the train {bank_side}"
        with Progress(f"bank pass ({what})", int(bank.shape[0]), logger="pipeline.score") as bar:
            block = bank_block_rows(self.memory, int(gallery.shape[0]))
            return bank_stats(gallery, bank, betas, partitions, bank_block=block, device=self.device,
                              progress=bar.update)

    def tune(self) -> dict[str, Any]:
        """Settings per method and direction: tuned on val (each bank pass at every beta of BETAS), else defaults."""
        if self.val is None:
            self.settings = {"qbnorm": {"i2t": BETA, "t2i": BETA}, "dbnorm": {"i2t": (BETA, BETA), "t2i": (BETA, BETA)}}
        else:
            v = self.val
            sims = _rows(v.images, 0, None, "cpu") @ _rows(v.texts, 0, None, "cpu").T
            needed = {("texts", "images"), ("images", "texts")} | \
                ({("texts", "texts"), ("images", "images")} if "dbnorm" in self.methods else set())
            qb = "qbnorm" in self.methods
            stats = {(side, bank_side): self._pass("val", getattr(v, side), side, bank_side, BETAS,
                                                   ACTIVE_ALL if qb and side != bank_side else None)
                     for side, bank_side in sorted(needed)}
            query_captions, query_images = stats["texts", "images"], stats["images", "texts"]
            if "qbnorm" in self.methods:
                b = tune_qbnorm(sims, v.text_to_image, query_captions, query_images)
                self.settings["qbnorm"] = {"i2t": b[0], "t2i": b[1]}
            if "dbnorm" in self.methods:
                b = tune_dbnorm(sims, v.text_to_image, query_captions, stats["texts", "texts"], query_images,
                                stats["images", "images"])
                self.settings["dbnorm"] = {"i2t": b[0], "t2i": b[1]}
        self.settings = {m: self.settings[m] for m in self.methods}
        log.info("%s: %s", self.name, "; ".join(f"{m} betas {s}" for m, s in self.settings.items()))
        return self.settings

    def _test(self) -> dict[tuple[str, str], BankStats]:
        """The test bank passes, at the tuned betas only (and the folds' activation sets for QB-Norm)."""
        if self._test_stats:
            return self._test_stats
        betas: dict[tuple[str, str], set[float]] = {}
        for m, s in self.settings.items():
            for direction, side in (("i2t", "texts"), ("t2i", "images")):
                if m == "qbnorm":
                    betas.setdefault((side, OTHER[side]), set()).add(s[direction])
                else:
                    betas.setdefault((side, OTHER[side]), set()).add(s[direction][0])
                    betas.setdefault((side, side), set()).add(s[direction][1])
        for (side, bank_side), bs in sorted(betas.items()):
            parts = None
            if "qbnorm" in self.methods and bank_side != side:
                parts = dict(ACTIVE_ALL)
                if self.folds is not None:
                    parts["folds"] = [torch.from_numpy(f[0 if side == "images" else 1]) for f in self.folds]
            self._test_stats[side, bank_side] = self._pass("test", getattr(self.test, side), side, bank_side,
                                                           sorted(bs), parts)
        return self._test_stats

    def scores(self, method: str, present: np.ndarray) -> Scores:
        """The method's (for_i2t, for_t2i) on any part of the test split."""
        stats, s = self._test(), self.settings[method]
        images = _rows(self.test.images, 0, None, "cpu")
        texts = _rows(self.test.texts, 0, None, "cpu")

        def block(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
            rows, cols = part.images, part.captions
            sims = _pick(images, rows) @ _pick(texts, cols).T
            if method == "qbnorm":
                where = "all" if part.fold is None else "folds"
                captions, imgs = stats["texts", "images"], stats["images", "texts"]
                return (qbnorm_i2t(sims, s["i2t"], _pick(captions.lse[s["i2t"]], cols),
                                   _pick(captions.active[where], cols)),
                        qbnorm_t2i(sims, s["t2i"], _pick(imgs.lse[s["t2i"]], rows), _pick(imgs.active[where], rows)))
            (a1, a2), (b1, b2) = s["i2t"], s["t2i"]
            return (dbnorm_i2t(sims, s["i2t"], _pick(stats["texts", "images"].lse[a1], cols),
                               _pick(stats["texts", "texts"].lse[a2], cols)),
                    dbnorm_t2i(sims, s["t2i"], _pick(stats["images", "texts"].lse[b1], rows),
                               _pick(stats["images", "images"].lse[b2], rows)))

        return Scores(present, block)
