"""COCO ids of a split's images and captions, read from a COCO captions file (e.g. captions_val2014.json).

Benchmarks keyed by COCO ids (ECCV Caption, CxC, PMRP) need, for every image of the split, its COCO image id,
and for every caption, its COCO caption annotation id. Neither is in the split index: an image is matched to
the file's ``images`` entry with the same file name, and each caption to an annotation of that image with the
same text (whitespace and case aside; equal texts pair up in order). Anything unmatched is refused by name,
never guessed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from data.errors import PipelineError
from data.index import SplitIndex


@dataclass(frozen=True)
class CocoIds:
    """``images[i]``: COCO image id of split image i; ``captions[j]``: COCO annotation id of split caption j."""

    images: np.ndarray
    captions: np.ndarray


def normalise_caption(text: str) -> str:
    """What two captions must share to be the same: their words, lower-cased (COCO's spacing is irregular)."""
    return " ".join(text.split()).lower()


def _read(path: Path) -> tuple[dict[str, int], dict[int, list[tuple[str, int]]]]:
    """({file name: image id}, {image id: [(normalised caption, annotation id), ...] in file order})."""
    if not path.is_file():
        raise PipelineError(f"--coco-captions {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"--coco-captions {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list) \
            or not isinstance(obj.get("annotations"), list):
        raise PipelineError(f"--coco-captions {path}: not a COCO captions file (needs 'images' and 'annotations' "
                            f"lists, as captions_val2014.json has)")
    files = {}
    for k, entry in enumerate(obj["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                or not isinstance(entry.get("id"), int):
            raise PipelineError(f"--coco-captions {path}: images[{k}] has no 'file_name' and integer 'id'")
        files[PurePosixPath(entry["file_name"]).name] = entry["id"]
    captions: dict[int, list[tuple[str, int]]] = {}
    for k, ann in enumerate(obj["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) \
                or not isinstance(ann.get("id"), int) or not isinstance(ann.get("image_id"), int):
            raise PipelineError(f"--coco-captions {path}: annotations[{k}] needs an integer 'id', an integer "
                                f"'image_id' and a 'caption'")
        captions.setdefault(ann["image_id"], []).append((normalise_caption(ann["caption"]), ann["id"]))
    return files, captions


def read_coco_ids(path: str | Path, index: SplitIndex) -> CocoIds:
    """The COCO image id of every image of ``index`` and the annotation id of every caption, from ``path``."""
    path = Path(path)
    files, annotations = _read(path)
    image_ids = np.empty(len(index.images), dtype=np.int64)
    caption_ids = np.empty(len(index.captions), dtype=np.int64)
    offsets = index.caption_offsets
    for i, image in enumerate(index.images):
        name = PurePosixPath(image.replace("\\", "/")).name
        if name not in files:
            raise PipelineError(f"--coco-captions {path}: image {image!r} of {index.dataset}/{index.split} is not "
                                f"in its 'images' list (matched by file name {name!r})")
        image_ids[i] = image_id = files[name]
        unused = list(annotations.get(image_id, []))
        for j in range(offsets[i], offsets[i + 1]):
            text = normalise_caption(index.captions[j])
            k = next((k for k, (t, _) in enumerate(unused) if t == text), None)
            if k is None:
                raise PipelineError(f"--coco-captions {path}: caption {j} of {index.dataset}/{index.split} "
                                    f"({index.captions[j]!r}, image {image!r}) matches no unused caption of COCO "
                                    f"image {image_id} there")
            caption_ids[j] = unused.pop(k)[1]
    return CocoIds(image_ids, caption_ids)
