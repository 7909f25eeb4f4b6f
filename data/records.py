"""The reader contract: a collection is a stream of records (image name, where its bytes are, captions, split);
one function groups them by image and assigns each image to its splits, whatever the format.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Callable, Iterable

from data.errors import PipelineError

log = logging.getLogger("pipeline.data")

# The splits a dataset defines, in the order they are extracted; "all" is every image of the file, whatever its split.
SPLITS = ("train", "val", "test", "all")
# Values a collection's own split column may hold (COCO's restval is train, Hugging Face's validation is val).
SPLIT_VALUES = {"train": "train", "restval": "train", "val": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class ReadOptions:
    """How to read a collection: its columns (None: the defaults), the hash holdout, and --skip-bad."""

    image_column: str | None = None
    caption_column: str | None = None
    holdout: tuple[float, float] | None = None
    skip_bad: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ReadOptions":
        """From an extraction config (``ExtractConfig.to_dict()``, or the one a store recorded)."""
        return cls(config.get("image_column"), config.get("caption_column"), parse_holdout(config.get("holdout")),
                   bool(config.get("skip_bad")))


@dataclass
class Record:
    """One row of a collection: an image's name in the split index, its captions as read (checked later),
    its split in the collection (None: the collection has none), where it is (for errors) and where its bytes
    are (``ref``: the format's own location; None when the name is a path under the image folder).
    ``problem``: why the row cannot be used (refused, or left out with --skip-bad)."""

    name: str
    captions: list
    split: str | None
    where: str
    ref: object = None
    problem: str | None = None


@dataclass
class Collection:
    """A readable collection: its records, and the image source of a split made from its records' refs."""

    name: str
    records: Iterable[Record]
    source: Callable[[list], object]


@dataclass
class Skipped:
    """Bad rows passed over with --skip-bad, logged once per collection."""

    source: str
    rows: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.rows.append(what)

    def report(self) -> None:
        if self.rows:
            shown = "; ".join(self.rows[:5]) + (f"; and {len(self.rows) - 5} more" if len(self.rows) > 5 else "")
            log.warning("%s: %d bad rows skipped (--skip-bad): %s", self.source, len(self.rows), shown)


def safe_relative(path: str, source) -> str:
    """Refuse image paths that are absolute or climb out of the image root."""
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise PipelineError(f"{source}: image path {path!r} is absolute or leaves the image folder; refused")
    return str(p)


def parse_holdout(text: str | None) -> tuple[float, float] | None:
    """``"0.05,0.05"`` -> (val, test) fractions; refused by flag when malformed."""
    if text is None:
        return None
    try:
        val, test = (float(x) for x in text.split(","))
    except ValueError:
        raise PipelineError(f"--holdout {text!r}: give the val and test fractions, e.g. 0.05,0.05") from None
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise PipelineError(f"--holdout {text!r}: fractions must be in [0, 1) and leave some images for train")
    return val, test


def holdout_split(name: str, holdout: tuple[float, float]) -> str:
    """train, val or test by a hash of the image's name: the same on every machine and every run."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if u < holdout[0] else "test" if u < holdout[0] + holdout[1] else "train"


def check_captions(captions: list, image: str, source, skip: Skipped | None = None) -> list[str]:
    """Stripped captions; an empty or missing one is refused by name, or (``skip``: --skip-bad) left out."""
    good = []
    for k, c in enumerate(captions):
        if isinstance(c, str) and c.strip():
            good.append(c.strip())
        elif skip is None:
            raise PipelineError(f"{source}: caption {k} of image {image!r} is empty")
        else:
            skip.add(f"caption {k} of image {image!r} is empty")
    if not captions:
        if skip is None:
            raise PipelineError(f"{source}: image {image!r} has no captions")
        skip.add(f"image {image!r} has no captions")
    return good


@dataclass
class _Image:
    name: str
    captions: list
    split: str | None
    where: str
    ref: object


def _group(records: Iterable[Record], source: str, skip: Skipped | None) -> list[_Image]:
    """Records of the same image (several rows per image) become one, captions in row order."""
    images: dict[str, _Image] = {}
    for rec in records:
        if rec.problem is not None:
            if skip is None:
                raise PipelineError(f"{rec.where}: {rec.problem} (pass --skip-bad to leave such rows out)")
            skip.add(f"{rec.where}: {rec.problem}")
            continue
        split = rec.split
        if split is not None:
            if str(split) not in SPLIT_VALUES:
                raise PipelineError(f"{rec.where}: split {split!r} of image {rec.name!r} is none of "
                                    f"{', '.join(SPLIT_VALUES)}")
            split = SPLIT_VALUES[str(split)]
        seen = images.get(rec.name)
        if seen is None:
            images[rec.name] = _Image(rec.name, list(rec.captions), split, rec.where, rec.ref)
            continue
        if seen.split != split:
            raise PipelineError(f"{source}: image {rec.name!r} is in split {seen.split} ({seen.where}) and in "
                                f"{split} ({rec.where})")
        seen.captions.extend(rec.captions)
    return list(images.values())


def split_samples(collection: Collection, splits: list[str] | None, options: ReadOptions
                  ) -> dict[str, list[tuple[str, list[str], object]]]:
    """(name, captions, ref) of each split's images, in collection order.

    The collection's own split column when it has one; else ``--holdout`` (a hash of each image's name);
    else the whole collection is the one split asked for (``splits``, as for a LAVIS file).
    """
    skip = Skipped(collection.name) if options.skip_bad else None
    images = []
    for image in _group(collection.records, collection.name, skip):
        captions = check_captions(image.captions, image.name, image.where, skip)
        if captions:
            images.append((image, captions))
    if skip is not None:
        skip.report()
    with_split = [image for image, _ in images if image.split is not None]
    if with_split and len(with_split) < len(images):
        first = next(image for image, _ in images if image.split is None)
        raise PipelineError(f"{first.where}: image {first.name!r} has no split, but others of "
                            f"{collection.name} do")
    if with_split and options.holdout:
        raise PipelineError(f"--holdout: {collection.name} has its own split column; leave --holdout out")
    if not with_split and not options.holdout and splits is None:
        raise PipelineError(f"{collection.name} has no split column: pass --split all (or train, val, test) to "
                            f"take it whole as that split, or --holdout VAL,TEST to split it by a hash of each "
                            f"image's name")
    keep = set(splits) if splits is not None else set(SPLITS) - {"all"}
    out: dict[str, list] = {}
    for image, captions in images:
        if with_split or options.holdout:
            own = image.split or holdout_split(image.name, options.holdout)
            targets = [s for s in (own, "all") if s in keep]
        else:
            targets = list(keep)
        for split in targets:
            out.setdefault(split, []).append((image.name, captions, image.ref))
    return {split: out[split] for split in SPLITS if split in out}
