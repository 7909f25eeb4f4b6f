"""ECCV Caption, CxC and PMRP metrics through the ``eccv_caption`` package (Chun et al., ECCV 2022).

The package ships the positives of COCO's 5K test split keyed by COCO ids (image ids; caption annotation ids):
the original COCO pairs, CxC's (Crisscrossed Captions) human-rated extra positives, ECCV Caption's
machine-and-human-verified ones and, from separately downloaded files, PMRP's plausible matches. It scores
ranked lists of ids. Here each query's list is its top K candidates in the recall metric's order; K = 50 is
enough for ECCV Caption (at most 48 positives per query), CxC and COCO R@10; with PMRP files K grows to the
longest PMRP positive list. A row's metrics are what ``Metrics.compute_all_metrics`` returns for TARGETS; PMRP is
asked of ``Metrics.pmrp`` and added as ``"pmrp"`` (compute_all_metrics of eccv_caption 0.1.0 would file it under
bare "i2t"/"t2i" keys). The gallery is the package's: 5,000 images and 25,000 captions, so a split's extra
captions (the Karpathy test split has 25,010) are left out of the image->text lists and are not queries.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from data.errors import PipelineError

LIST_LENGTH = 50
TARGETS = ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls", "coco_5k_recalls")
KS = (1, 5, 10)
PM_FILES = ("pm_image_to_caption.json", "pm_caption_to_image.json")


def load_metrics(pmrp: str | None = None):
    """The package's ``Metrics`` (with PMRP's positives when ``pmrp`` names the folder holding PM_FILES)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson": the package falls back to json
        from eccv_caption import Metrics
    if pmrp is not None:
        for name in PM_FILES:
            if not (Path(pmrp) / name).is_file():
                raise PipelineError(f"--pmrp {pmrp}: no {name} there (PMRP's files are downloaded separately: see "
                                    f"the eccv_caption README)")
    return Metrics(extra_file_dir=pmrp)


def _example(values) -> str:
    return ", ".join(str(v) for v in sorted(values)[:3])


class EccvMetrics:
    """Scores one method's top-K lists with the package, for a split whose COCO ids are known."""

    def __init__(self, image_ids: np.ndarray, caption_ids: np.ndarray, where: str, pmrp: str | None = None):
        self.metrics = load_metrics(pmrp)
        self.targets = TARGETS + (("pmrp",) if pmrp else ())  # what a row's dict holds
        self.image_ids, self.caption_ids = np.asarray(image_ids), np.asarray(caption_ids)
        package_images = set(self.metrics.coco_gts["i2t"])
        package_captions = set(int(c) for c in self.metrics.coco_ids)
        ours = set(self.image_ids.tolist())
        if len(ours) != len(self.image_ids) or ours != package_images:
            raise PipelineError(
                f"--eccv needs COCO's 5K test split, as eccv_caption ships it: {where} has {len(self.image_ids):,} "
                f"images ({len(ours):,} distinct COCO ids); {len(package_images - ours):,} of the package's "
                f"{len(package_images):,} are missing (e.g. COCO ids {_example(package_images - ours)}) and "
                f"{len(ours - package_images):,} are not among them (e.g. {_example(ours - package_images)})")
        missing = package_captions - set(self.caption_ids.tolist())
        if missing:
            raise PipelineError(f"--eccv: {len(missing):,} of the package's {len(package_captions):,} test captions "
                                f"are not among the captions of {where} (e.g. annotation ids {_example(missing)})")
        self.kept = np.isin(self.caption_ids, np.fromiter(package_captions, dtype=np.int64))
        pm = getattr(self.metrics, "pm_gts", None) or {}
        longest = max((len(v) for gts in (self.metrics.eccv_gts, pm) for d in gts.values() for v in d.values()),
                      default=0)
        self.k = max(LIST_LENGTH, longest)

    @property
    def left_out(self) -> int:
        """Captions of the split outside the package's gallery."""
        return int((~self.kept).sum())

    @property
    def i2t_length(self) -> int:
        """Captions to take per image so that K remain once the left-out ones are dropped."""
        return self.k + self.left_out

    def __call__(self, i2t_top: torch.Tensor, t2i_top: torch.Tensor) -> dict:
        """``Metrics.compute_all_metrics`` of the lists: i2t_top[i] caption rows ranked for split image i (at least
        ``i2t_length``), t2i_top[j] image rows ranked for split caption j (at least ``k``)."""
        i2t_rows, t2i_rows = i2t_top.numpy(), t2i_top.numpy()
        i2t = {}
        for image_id, row in zip(self.image_ids.tolist(), i2t_rows):
            i2t[image_id] = self.caption_ids[row[self.kept[row]][:self.k]].tolist()
        ids = self.image_ids[t2i_rows[:, :self.k]]
        t2i = {c: ids[j].tolist() for j, c in enumerate(self.caption_ids.tolist()) if self.kept[j]}
        with contextlib.redirect_stderr(io.StringIO()):  # the package draws progress bars it cannot switch off
            out = self.metrics.compute_all_metrics(i2t, t2i, target_metrics=TARGETS, Ks=KS, verbose=False)
            if "pmrp" in self.targets:
                out["pmrp"] = self.metrics.pmrp({"i2t": i2t, "t2i": t2i}, "all")
        return out
