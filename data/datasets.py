"""Dataset readers: Karpathy split files (Flickr30k, COCO, demo) and ALBEF/LAVIS annotation files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data.errors import PipelineError
from data.index import SplitIndex

DATASETS = ("flickr30k", "coco", "demo")
SPLITS = ("train", "val", "test", "all")


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
        return DatasetSpec(dataset, Path(annotations), Path(images), karpathy=_is_karpathy(Path(annotations)))
    root = Path(data_root) / dataset
    spec = DatasetSpec(dataset, root / f"dataset_{dataset}.json", root / "images")
    if dataset not in DATASETS and not spec.annotations.is_file():
        raise PipelineError(f"unknown --dataset {dataset!r}: choose one of {', '.join(DATASETS)}, put a Karpathy "
                            f"file at {spec.annotations}, or pass --annotations PATH --images DIR")
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


def read_karpathy(path: Path, split: str) -> list[tuple[str, list[str]]]:
    """(image path, captions) in file order; COCO's ``restval`` counts as train; ``all`` keeps every image."""
    obj = _load_json(path)
    if not isinstance(obj, dict) or "images" not in obj:
        raise PipelineError(f"{path}: not a Karpathy split file (no 'images' list)")
    samples = []
    for entry in obj["images"]:
        entry_split = "train" if entry.get("split") == "restval" else entry.get("split")
        if split != "all" and entry_split != split:
            continue
        rel = "/".join(p for p in (entry.get("filepath", ""), entry["filename"]) if p)
        caps = [s["raw"] for s in entry.get("sentences", [])]
        samples.append((safe_relative(rel, path), _check_captions(caps, rel, path)))
    return samples


def read_lavis(path: Path) -> list[tuple[str, list[str]]]:
    """LAVIS/ALBEF files: eval lists {"image", "caption": [...]}, train lists one {"image", "caption"} per pair."""
    obj = _load_json(path)
    if not isinstance(obj, list):
        raise PipelineError(f"{path}: not a LAVIS annotation file (expected a JSON list)")
    grouped: dict[str, list[str]] = {}
    for k, entry in enumerate(obj):
        if "image" not in entry or "caption" not in entry:
            raise PipelineError(f"{path}: entry {k} lacks 'image' or 'caption'")
        caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        grouped.setdefault(safe_relative(entry["image"], path), []).extend(caps)
    return [(img, _check_captions(caps, img, path)) for img, caps in grouped.items()]


def load_split(spec: DatasetSpec, split: str) -> SplitIndex:
    """Read one split of a dataset into its index."""
    if split not in SPLITS:
        raise PipelineError(f"unknown --split {split!r}: choose one of {', '.join(SPLITS)}")
    samples = read_karpathy(spec.annotations, split) if spec.karpathy else read_lavis(spec.annotations)
    if not samples:
        raise PipelineError(f"{spec.annotations}: no images in split {split!r}")
    return SplitIndex.from_samples(spec.name, split, samples)
