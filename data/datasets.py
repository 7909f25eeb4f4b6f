"""Dataset readers: Karpathy split files (Flickr30k, COCO, demo), ALBEF/LAVIS annotation files, captions tables
(CSV, TSV, JSON Lines, parquet: data/tables.py) and webdataset tar shards (data/webdataset.py).

Every format gives the same split index (data/index.py) and an image source (data/image_source.py) that a
shard job reads its rows' images from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data.discover import datasets_under
from data.errors import PipelineError
from data.image_source import FolderImages
from data.index import SplitIndex
from data.records import (
    SPLITS,
    Collection,
    ReadOptions,
    Skipped,
    check_captions,
    safe_relative,
    split_samples,
)
from data.tables import TABLE_FORMATS, read_parquet, read_text_table
from data.webdataset import read_webdataset, shard_paths

__all__ = ["SPLITS", "DatasetSpec", "resolve", "load_splits", "load_split", "safe_relative", "image_folder",
           "dataset_family"]
COLLECTION_FLAGS = ("--image-column", "--caption-column", "--holdout")
# Where --captions-per-image applies: the splits that are scored (the reference trains on every caption).
EVAL_SPLITS = ("val", "test", "all")
# Names of the two datasets the published checkpoints were fine-tuned on (lower-case), by family.
FAMILIES = {"flickr30k": ("flickr30k", "flickr", "f30k"), "coco": ("coco", "mscoco", "coco_karpathy", "coco_retrieval")}


def dataset_family(name: str | None) -> str | None:
    """``flickr30k`` or ``coco`` for a dataset named as one of them (see FAMILIES), else None."""
    name = (name or "").lower()
    return next((family for family, names in FAMILIES.items() if name in names), None)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's annotations and images are, and in which format.

    ``format``: karpathy, lavis, csv, tsv, jsonl, parquet or webdataset (``annotations`` is then the pattern);
    ``image_root`` None: the images are in the collection itself, or named by absolute paths.
    """

    name: str
    annotations: Path | str
    image_root: Path | None
    format: str = "karpathy"
    options: ReadOptions = field(default_factory=ReadOptions)


def resolve(dataset: str, data_root: str | Path = "datasets", annotations: str | Path | None = None,
            images: str | Path | None = None, webdataset: str | None = None,
            options: ReadOptions | None = None) -> DatasetSpec:
    """Locate a dataset: the Karpathy layout under ``data_root``, an annotation file, or webdataset shards."""
    options = options or ReadOptions()
    if webdataset is not None:
        if annotations is not None or images is not None:
            raise PipelineError("--webdataset reads tar shards that hold their images and captions: leave out "
                                "--annotations and --images")
        shard_paths(webdataset)  # a pattern naming no file is refused here
        return DatasetSpec(dataset, webdataset, None, "webdataset", options)
    if annotations is not None:
        fmt = TABLE_FORMATS.get(Path(annotations).suffix.lower())
        if fmt is None and images is None:
            raise PipelineError("--annotations needs --images DIR (the folder the annotation paths are relative to)")
        if not Path(annotations).is_file():
            raise PipelineError(f"--annotations {annotations}: no such file")
        if fmt is None:
            fmt = "karpathy" if _is_karpathy(Path(annotations)) else "lavis"
            _no_collection_options(options, f"--annotations {annotations} (a {fmt} JSON file)")
        return DatasetSpec(dataset, Path(annotations), Path(images) if images is not None else None, fmt, options)
    if images is not None:
        raise PipelineError("--images goes with --annotations FILE (without it, images are read from --data-root)")
    _no_collection_options(options, f"--dataset {dataset} (a Karpathy split file)")
    root = Path(data_root) / dataset
    spec = DatasetSpec(dataset, root / f"dataset_{dataset}.json", root / "images", options=options)
    if not spec.annotations.is_file():
        found = ", ".join(datasets_under(data_root)) or "none"
        raise PipelineError(f"unknown --dataset {dataset!r}: no {spec.annotations} (datasets under {data_root}: "
                            f"{found}); pass another --dataset or --data-root, or --annotations FILE --images DIR")
    return spec


def _no_collection_options(options: ReadOptions, what: str) -> None:
    given = [f for f, v in zip(COLLECTION_FLAGS, (options.image_column, options.caption_column, options.holdout)) if v]
    if given:
        raise PipelineError(f"{', '.join(given)}: for captions tables (.csv, .tsv, .jsonl, .parquet) and "
                            f"--webdataset shards, not {what}")


def _is_karpathy(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.read(1) == "{"


def _load_json(path: Path):
    if not path.is_file():
        raise PipelineError(f"annotation file {path} not found (see README: datasets)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PipelineError(f"annotation file {path} is not valid JSON: {e}") from None


def read_karpathy(path: Path, splits: list[str] | None, skip: Skipped | None = None
                  ) -> dict[str, list[tuple[str, list[str]]]]:
    """(image path, captions) of each split, in file order, from one read of the file.

    ``splits`` None: every split the file defines, in SPLITS order. COCO's ``restval`` counts as train;
    ``all`` keeps every image. ``skip`` (--skip-bad): empty captions are left out, and images left without one.
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
        sample = (safe_relative(rel, path), check_captions([s["raw"] for s in sentences], rel, path, skip))
        for split in targets if sample[1] else ():
            samples.setdefault(split, []).append(sample)
    return {split: samples[split] for split in SPLITS if split in samples}


def read_lavis(path: Path, skip: Skipped | None = None) -> list[tuple[str, list[str]]]:
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
    checked = [(img, check_captions(caps, img, path, skip)) for img, caps in grouped.items()]
    return [(img, caps) for img, caps in checked if caps]


def first_captions(samples: list[tuple], k: int) -> list[tuple]:
    """Each image with its first ``k`` captions (the reference evaluates with 5: COCO's test split then has 25,000);
    a sample is (image, captions, ...), the rest kept."""
    return [(image, captions[:k], *rest) for image, captions, *rest in samples]


def load_splits(spec: DatasetSpec, splits: list[str] | None = None,
                captions_per_image: int | None = None) -> dict[str, SplitIndex]:
    """Read splits of a dataset into their indexes (one read of the annotations); None: every split it defines.

    ``captions_per_image``: keep only the first K captions of each image of the scored splits (EVAL_SPLITS). Each index
    carries its image source (``index.source``), which extraction reads the images from.
    """
    for split in splits or ():
        if split not in SPLITS:
            raise PipelineError(f"unknown --split {split!r}: choose one of {', '.join(SPLITS)}")
    if spec.format in ("karpathy", "lavis"):
        collection, samples = None, _read_json_dataset(spec, splits)
    else:
        collection = open_collection(spec)
        samples = split_samples(collection, splits, spec.options)
    for split in splits or ():
        if not samples.get(split):
            raise PipelineError(f"{spec.annotations}: no images in split {split!r}")
    if not samples:
        raise PipelineError(f"{spec.annotations}: no images in any of the splits {', '.join(SPLITS[:-1])}")
    if captions_per_image:
        samples = {split: first_captions(rows, captions_per_image) if split in EVAL_SPLITS else rows
                   for split, rows in samples.items()}
    return {split: SplitIndex.from_samples(spec.name, split, [(name, caps) for name, caps, *_ in rows],
                                           FolderImages(spec.image_root) if collection is None
                                           else collection.source([ref for *_, ref in rows]))
            for split, rows in samples.items()}


def _read_json_dataset(spec: DatasetSpec, splits: list[str] | None) -> dict[str, list[tuple[str, list[str]]]]:
    skip = Skipped(str(spec.annotations)) if spec.options.skip_bad else None
    if spec.format == "karpathy":
        samples = read_karpathy(spec.annotations, splits, skip)
    elif splits is None:
        raise PipelineError(f"--annotations {spec.annotations} holds one split, unnamed: say which with --split")
    else:
        rows = read_lavis(spec.annotations, skip)  # one unnamed split: the same rows for each asked
        samples = dict.fromkeys(splits, rows)
    if skip is not None:
        skip.report()
    return samples


def open_collection(spec: DatasetSpec) -> Collection:
    """The records of a captions table or of webdataset shards."""
    if spec.format == "webdataset":
        return read_webdataset(str(spec.annotations), spec.options)
    if spec.format == "parquet":
        return read_parquet(spec.annotations, spec.image_root, spec.options)
    return read_text_table(spec.annotations, spec.format, spec.image_root, spec.options)


def load_split(spec: DatasetSpec, split: str, captions_per_image: int | None = None) -> SplitIndex:
    """Read one split of a dataset into its index."""
    return load_splits(spec, [split], captions_per_image)[split]


def recorded_images(config: dict, index: SplitIndex):
    """Where a cached split's images are read from (an image source: data/image_source.py), rebuilt from the
    extraction config its store recorded; None when that reading no longer gives the same split index (the
    annotations moved or changed)."""
    try:
        options = ReadOptions.from_config(config)
        spec = resolve(index.dataset, config.get("data_root") or "datasets", config.get("annotations"),
                       config.get("images"), config.get("webdataset"), options)
        rebuilt = load_split(spec, index.split, config.get("captions_per_image"))
    except (PipelineError, OSError):
        return None
    return rebuilt.source if rebuilt.version == index.version else None


def image_folder(config: dict) -> Path | None:
    """The folder an extraction's image names are relative to, from its recorded config (None: the names are
    tar members, parquet keys or absolute paths)."""
    if config.get("webdataset"):
        return None
    if config.get("annotations"):
        return Path(config["images"]) if config.get("images") else None
    return Path(config.get("data_root") or "datasets") / config["dataset"] / "images"
