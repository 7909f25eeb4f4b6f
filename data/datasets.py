"""Dataset readers: Karpathy split files (Flickr30k, COCO, demo) and ALBEF/LAVIS annotation files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data.discover import datasets_under
from data.errors import PipelineError
from data.index import SplitIndex

# The splits a dataset defines, in the order they are extracted; "all" is every image of the file, whatever its split.
SPLITS = ("train", "val", "test", "all")
EVAL_SPLITS = ("val", "test")  # where --captions-per-image applies: the reference trains on every caption
# Names of the two datasets the published checkpoints were fine-tuned on (lower-case), by family.
FAMILIES = {"flickr30k": ("flickr30k", "flickr", "f30k"), "coco": ("coco", "mscoco", "coco_karpathy", "coco_retrieval")}


def dataset_family(name: str | None) -> str | None:
    """``flickr30k`` or ``coco`` for a dataset named as one of them (see FAMILIES), else None."""
    name = (name or "").lower()
    return next((family for family, names in FAMILIES.items() if name in names), None)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's annotations and images are; ``karpathy`` False means the LAVIS format."""

    name: str
    annotations: Path
    image_root: Path
    karpathy: bool = True


def resolve(dataset: str, data_root: str | Path = "datasets", annotations: str | Path | None = None,
            images: str | Path | None = None) -> DatasetSpec:
    """Locate a dataset: the Karpathy layout under ``data_root``, or explicit LAVIS-style files."""
    if annotations is not None:
        if images is None:
            raise PipelineError("--annotations needs --images DIR (the folder the annotation paths are relative to)")
        if not Path(annotations).is_file():
            raise PipelineError(f"--annotations {annotations}: no such file")
        return DatasetSpec(dataset, Path(annotations), Path(images), karpathy=_is_karpathy(Path(annotations)))
    if images is not None:
        raise PipelineError("--images goes with --annotations FILE (without it, images are read from --data-root)")
    root = Path(data_root) / dataset
    spec = DatasetSpec(dataset, root / f"dataset_{dataset}.json", root / "images")
    if not spec.annotations.is_file():
        found = ", ".join(datasets_under(data_root)) or "none"
        raise PipelineError(f"unknown --dataset {dataset!r}: no {spec.annotations} (datasets under {data_root}: "
                            f"{found}); pass another --dataset or --data-root, or --annotations FILE --images DIR")
    return spec


def _is_karpathy(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.read(1) == "{"


def safe_relative(path: str, source: Path) -> str:
    """Refuse image paths that are absolute or climb out of the image root."""
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise PipelineError(f"{source}: image path {path!r} is absolute or leaves the image folder; refused")
    return str(p)


def _check_captions(captions: list[str], image: str, source: Path) -> list[str]:
    if not captions:
        raise PipelineError(f"{source}: image {image!r} has no captions")
    for k, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise PipelineError(f"{source}: caption {k} of image {image!r} is empty")
    return [c.strip() for c in captions]


def _load_json(path: Path):
    if not path.is_file():
        raise PipelineError(f"annotation file {path} not found (see README: datasets)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PipelineError(f"annotation file {path} is not valid JSON: {e}") from None


def read_karpathy(path: Path, splits: list[str] | None) -> dict[str, list[tuple[str, list[str]]]]:
    """(image path, captions) of each split, in file order, from one read of the file.

    ``splits`` None: every split the file defines, in SPLITS order. COCO's ``restval`` counts as train;
    ``all`` keeps every image.
    """
    obj = _load_json(path)
    if not isinstance(obj, dict) or "images" not in obj:
        raise PipelineError(f"{path}: not a Karpathy split file (no 'images' list)")
    keep = set(splits) if splits is not None else set(SPLITS) - {"all"}
    samples: dict[str, list] = {}
    if not isinstance(obj["images"], list):
        raise PipelineError(f"{path}: 'images' is not a list")
    for k, entry in enumerate(obj["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise PipelineError(f"{path}: images[{k}] is not an entry with a 'filename'")
        entry_split = "train" if entry.get("split") == "restval" else entry.get("split")
        targets = [s for s in (entry_split, "all") if s in keep]
        if not targets:
            continue
        rel = "/".join(p for p in (str(entry.get("filepath") or ""), entry["filename"]) if p)
        sentences = entry.get("sentences", [])
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise PipelineError(f"{path}: image {rel!r} has sentences without a 'raw' caption")
        sample = (safe_relative(rel, path), _check_captions([s["raw"] for s in sentences], rel, path))
        for split in targets:
            samples.setdefault(split, []).append(sample)
    return {split: samples[split] for split in SPLITS if split in samples}


def read_lavis(path: Path) -> list[tuple[str, list[str]]]:
    """LAVIS/ALBEF files: eval lists {"image", "caption": [...]}, train lists one {"image", "caption"} per pair."""
    obj = _load_json(path)
    if not isinstance(obj, list):
        raise PipelineError(f"{path}: not a LAVIS annotation file (expected a JSON list)")
    grouped: dict[str, list[str]] = {}
    for k, entry in enumerate(obj):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
            raise PipelineError(f"{path}: entry {k} is not an object with an 'image' path and a 'caption'")
        caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        grouped.setdefault(safe_relative(entry["image"], path), []).extend(caps)
    return [(img, _check_captions(caps, img, path)) for img, caps in grouped.items()]


def first_captions(samples: list[tuple[str, list[str]]], k: int) -> list[tuple[str, list[str]]]:
    """Each image with its first ``k`` captions (the reference evaluates with 5: COCO's test split then has 25,000)."""
    return [(image, captions[:k]) for image, captions in samples]


def load_splits(spec: DatasetSpec, splits: list[str] | None = None,
                captions_per_image: int | None = None) -> dict[str, SplitIndex]:
    """Read splits of a dataset into their indexes (one read of the annotations); None: every split it defines.

    ``captions_per_image``: keep only the first K captions of each image of the val and test splits.
    """
    for split in splits or ():
        if split not in SPLITS:
            raise PipelineError(f"unknown --split {split!r}: choose one of {', '.join(SPLITS)}")
    if spec.karpathy:
        samples = read_karpathy(spec.annotations, splits)
    elif splits is None:
        raise PipelineError(f"--annotations {spec.annotations} holds one split, unnamed: say which with --split")
    else:
        samples = {split: read_lavis(spec.annotations) for split in splits}
    for split in splits or ():
        if not samples.get(split):
            raise PipelineError(f"{spec.annotations}: no images in split {split!r}")
    if not samples:
        raise PipelineError(f"{spec.annotations}: no images in any of the splits {', '.join(SPLITS[:-1])}")
    if captions_per_image:
        samples = {split: first_captions(rows, captions_per_image) if split in EVAL_SPLITS else rows
                   for split, rows in samples.items()}
    return {split: SplitIndex.from_samples(spec.name, split, rows) for split, rows in samples.items()}


def load_split(spec: DatasetSpec, split: str, captions_per_image: int | None = None) -> SplitIndex:
    """Read one split of a dataset into its index."""
    return load_splits(spec, [split], captions_per_image)[split]
