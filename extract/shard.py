"""Runner for one shard: reader -> mapper -> writer, the store file written atomically."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from data.device import pick_device
from data.errors import PipelineError
from data.store import FeatureStore, shard_name, write_shard
from extract.backbones import load
from extract.mapper import NonFiniteFeatures, map_images, map_texts
from extract.reader import ImageRows, image_batches


@dataclass(frozen=True)
class ShardJob:
    """The unit of work: which rows of which kind go into which file."""

    kind: str  # "images" or "texts"
    number: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.kind, self.number)


@dataclass
class ShardResult:
    job: ShardJob
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    truncated: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    written: bool = False


def run_shard(job: ShardJob, cfg, index, images, attrs: dict, progress=None) -> ShardResult:
    """Encode one shard's rows and write ``<store>/<name>``; a shard with bad images is not written.

    ``images``: where the rows' images are read from (data/image_source.py).
    """
    t0 = time.perf_counter()
    result = ShardResult(job)
    device = pick_device(cfg.device)
    backbone = load(cfg.backbone, cfg.backbone_options(), device)
    try:
        if job.kind == "images":
            rows = list(range(job.start, job.stop))
            reader = ImageRows(images.refs(index, rows), rows, cfg.views, backbone.eval_transform(),
                               backbone.train_transform() if cfg.views else None, cfg.seed, backbone.name)
            data, result.bad = map_images(backbone, image_batches(reader, cfg.batch_size, cfg.workers), cfg, device,
                                          progress)
        else:
            data, result.truncated = map_texts(backbone, index.captions, job.start, job.stop, cfg, device, progress)
    except NonFiniteFeatures as e:
        raise PipelineError(nonfinite_message(cfg, index, images, job.kind, e.ids)) from None
    result.rows = len(data)
    if not result.bad or cfg.skip_bad:
        store = FeatureStore.at(cfg.cache, index.dataset, index.split, cfg.store)
        result.bytes = write_shard(store.root / job.name, data, {**attrs, "kind": job.kind, "start": job.start,
                                                                   "stop": job.stop, "truncated": result.truncated,
                                                                   "bad_images": json.dumps(result.bad)})
        result.written = True
    result.seconds = time.perf_counter() - t0
    return result


def nonfinite_message(cfg, index, images, kind: str, ids: list[int]) -> str:
    """Name the images or captions whose features are not finite; nothing of their shard was written."""
    named = [str(ref) for ref in images.refs(index, ids)] if kind == "images" else \
        [f"caption {i} {index.captions[i]!r}" for i in ids]
    shown = "\n  ".join(named[:20]) + (f"\n  ... and {len(named) - 20} more" if len(named) > 20 else "")
    what = "image(s)" if kind == "images" else "caption(s)"
    return (f"{cfg.backbone} gave non-finite features (NaN or inf, or node features beyond float16's range of "
            f"+-65504, the store's precision) for {len(ids)} {what}; nothing of their shard was written:\n  {shown}\n"
            f"With --precision {cfg.precision}" + (", try --precision fp32; if it persists, " if cfg.precision != "fp32"
                                                   else ", ") + "check the weights (--checkpoint) and these inputs.")
