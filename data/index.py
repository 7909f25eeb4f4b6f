"""The split index: the ordered images and captions of one dataset split, stored once per cache."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.atomic import read_json, write_json
from data.errors import PipelineError


@dataclass(frozen=True)
class SplitIndex:
    """Images in annotation-file order; each image's captions in order, contiguous.

    ``text_to_image[j]`` is the image row of caption j; ``caption_offsets[i]:caption_offsets[i+1]``
    are image i's caption rows. Every stage refers to images and captions by these row numbers.
    ``source`` (data/image_source.py) says where each row's image is read from: set by the dataset readers,
    not part of the index's identity, not stored.
    """

    dataset: str
    split: str
    images: tuple[str, ...]
    captions: tuple[str, ...]
    text_to_image: np.ndarray
    source: object = field(default=None, compare=False, repr=False)

    @classmethod
    def from_samples(cls, dataset: str, split: str, samples: list[tuple[str, list[str]]],
                     source: object = None) -> "SplitIndex":
        images = tuple(path for path, _ in samples)
        captions = tuple(c for _, caps in samples for c in caps)
        t2i = np.repeat(np.arange(len(samples), dtype=np.int64), [len(caps) for _, caps in samples])
        return cls(dataset, split, images, captions, t2i, source)

    @property
    def caption_offsets(self) -> np.ndarray:
        counts = np.bincount(self.text_to_image, minlength=len(self.images))
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def image_to_texts(self) -> list[list[int]]:
        off = self.caption_offsets
        return [list(range(off[i], off[i + 1])) for i in range(len(self.images))]

    @property
    def version(self) -> str:
        """Content hash of images, captions and their pairing: stores made from another version are refused."""
        h = hashlib.sha256()
        h.update(json.dumps([self.images, self.captions], ensure_ascii=False).encode())
        h.update(self.text_to_image.tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.dataset}/{self.split}: {len(self.images)} images, {len(self.captions)} captions"

    def save(self, path: str | Path) -> None:
        write_json(path, {
            "dataset": self.dataset, "split": self.split, "version": self.version,
            "images": list(self.images), "captions": list(self.captions),
            "text_to_image": self.text_to_image.tolist(), "image_to_texts": self.image_to_texts,
        })

    @classmethod
    def load(cls, path: str | Path) -> "SplitIndex":
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"no split index at {path}: run `pipeline extract --split {path.parent.name}` for "
                                f"this dataset first")
        obj = read_json(path)
        index = cls(obj["dataset"], obj["split"], tuple(obj["images"]), tuple(obj["captions"]),
                    np.asarray(obj["text_to_image"], dtype=np.int64))
        if index.version != obj["version"]:
            raise PipelineError(f"split index {path} is corrupt: its content does not match its recorded version")
        return index


def index_path(cache: str | Path, dataset: str, split: str) -> Path:
    return Path(cache) / dataset / split / "index.json"


def store_index(index: SplitIndex, cache: str | Path) -> Path:
    """Write the index beside the backbone stores, or check that the one there is the same."""
    path = index_path(cache, index.dataset, index.split)
    if path.is_file():
        old = SplitIndex.load(path)
        if old.version != index.version:
            raise PipelineError(
                f"the split index at {path} ({old.describe()}, version {old.version}) differs from the "
                f"annotations read now ({index.describe()}, version {index.version}); use another --cache "
                f"or remove {path.parent} to re-extract")
        return path
    index.save(path)
    return path
