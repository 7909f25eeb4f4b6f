"""Webdataset tar shards as img2dataset writes them: ``{key}.jpg|png|webp`` beside ``{key}.txt`` and/or ``{key}.json``.

Shards are named by a path, a glob or a brace pattern (``shards/{00000..00127}.tar``). Each tar is read once,
header by header (member data is skipped, only the small caption members are read); every image is indexed
by its tar and byte offset, which is how a shard job later reads exactly its own images. Members group into
samples as webdataset groups them: the key is the member name up to the first dot of its file name.
"""
from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from data.errors import PipelineError
from data.image_source import TarMembers
from data.progress import Progress
from data.records import Collection, ReadOptions, Record
from data.tables import CAPTION_COLUMNS, caption_list

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode formats (and webdataset's jpeg)
SPLIT_FIELD = "split"
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b`` -> a0b a1b a2b (zero-padded like the bounds), ``{x,y}`` -> x y; nested and repeated."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        lo, hi = bounds.groups()
        width = max(len(lo), len(hi)) if (lo.startswith("0") and len(lo) > 1) or (hi.startswith("0") and
                                                                                  len(hi) > 1) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise PipelineError(f"--webdataset {pattern!r}: {{{body}}} is neither a range {{A..B}} nor a list {{a,b}}")
    return [out for item in items for out in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def shard_paths(pattern: str) -> list[Path]:
    """The tar files a pattern names, in its order (a glob's matches sorted); each must exist."""
    paths: list[Path] = []
    for part in expand_braces(pattern):
        if glob.has_magic(part):
            found = sorted(glob.glob(part))
            if not found:
                raise PipelineError(f"--webdataset {pattern!r}: nothing matches {part}")
            paths += [Path(p) for p in found]
        elif not Path(part).is_file():
            raise PipelineError(f"--webdataset {pattern!r}: no such file {part}")
        else:
            paths.append(Path(part))
    return list(dict.fromkeys(paths))


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) as webdataset splits a member name: at the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def open_tar(path: Path) -> tarfile.TarFile:
    """An uncompressed tar (compressed members have no byte offset a job could seek to)."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind in COMPRESSED.items():
        if head.startswith(magic):
            raise PipelineError(f"{path}: a {kind}-compressed tar; its images cannot be read by offset: decompress "
                                f"it first (img2dataset writes uncompressed .tar)")
    try:
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as e:
        raise PipelineError(f"{path}: not a tar file ({e})") from None


class Sample:
    """The members of one key; fields are read from a member ``{key}.<name>`` or, failing that, ``{key}.json``."""

    def __init__(self, tar: tarfile.TarFile, path: Path, key: str, members: dict[str, tarfile.TarInfo]):
        self.tar, self.path, self.key, self.members = tar, path, key, members
        self._meta = None

    def text(self, ext: str) -> str:
        try:
            return self.tar.extractfile(self.members[ext]).read().decode("utf-8")
        except UnicodeDecodeError:
            raise PipelineError(f"{self.path}: member {self.members[ext].name} is not UTF-8 text") from None

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = {}
            if "json" in self.members:
                try:
                    self._meta = json.loads(self.text("json"))
                except json.JSONDecodeError as e:
                    raise PipelineError(f"{self.path}: member {self.members['json'].name} is not valid JSON: {e}") \
                        from None
                if not isinstance(self._meta, dict):
                    raise PipelineError(f"{self.path}: member {self.members['json'].name} is not a JSON object")
        return self._meta

    def field(self, name: str):
        if name in self.members and name != "json":
            return self.text(name)
        return self.meta.get(name)

    def fields(self) -> list[str]:
        return sorted(set(self.members) | set(self.meta))


def tar_samples(path: Path) -> Iterator[Sample]:
    """The samples of one tar in member order, its headers read one by one."""
    tar = open_tar(path)
    with tar:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for member in tar:
                split = split_name(member.name) if member.isfile() else None
                if split is not None:
                    samples.setdefault(split[0], {})[split[1]] = member
        except tarfile.TarError as e:
            raise PipelineError(f"{path}: a damaged tar file ({e})") from None
        for key, members in samples.items():
            yield Sample(tar, path, key, members)


def read_webdataset(pattern: str, options: ReadOptions) -> Collection:
    """Records of every sample of the shards, in shard and member order; the split source holds tar offsets."""
    paths = shard_paths(pattern)
    image_exts = (options.image_column,) if options.image_column else IMAGE_EXTENSIONS
    # a member extension, else a field of {key}.json: img2dataset's .txt member, or its .json's caption field
    caption_fields = (options.caption_column,) if options.caption_column else CAPTION_COLUMNS

    def records():
        seen: dict[str, Path] = {}
        with Progress(f"reading {pattern}", len(paths), unit="shard", logger="pipeline.data") as progress:
            for number, path in enumerate(paths):
                found = {"images": 0, "captions": 0, "fields": set()}
                for sample in tar_samples(path):
                    image = next((e for e in image_exts if e in sample.members), None)
                    value = next((v for v in map(sample.field, caption_fields) if v is not None), None)
                    if number == 0:  # what check_first_shard reports on
                        found["images"] += image is not None
                        found["captions"] += value is not None
                        found["fields"] |= set(sample.fields())
                    member = sample.members.get(image)
                    name = member.name if member is not None else sample.key
                    if name in seen:
                        raise PipelineError(f"{path}: sample {sample.key!r} repeats one of {seen[name]}; keys must be "
                                            f"unique across the shards")
                    seen[name] = path
                    ref = (number, member.offset_data, member.size) if member is not None else (number, 0, -1)
                    yield Record(name, caption_list(value), sample.field(SPLIT_FIELD), f"{path}:{sample.key}", ref)
                if number == 0:
                    check_first_shard(path, found, image_exts, caption_fields)
                progress.update(1)

    def source(refs: list) -> TarMembers:
        table = np.asarray(refs, np.int64).reshape(-1, 3)
        return TarMembers(tuple(paths), table[:, 0].astype(np.int32), table[:, 1], table[:, 2], pattern)
    return Collection(f"--webdataset {pattern}", records(), source)


def check_first_shard(path: Path, found: dict, image_exts, caption_fields) -> None:
    """A first shard without any image or caption under the names asked for: a wrong name, said at once."""
    listed = ", ".join(sorted(found["fields"])) or "none"
    if not found["images"]:
        raise PipelineError(f"{path}: no sample has an image member ({', '.join('.' + e for e in image_exts)}); "
                            f"its members and fields: {listed}; name the image extension with --image-column")
    if not found["captions"]:
        raise PipelineError(f"{path}: no sample has a caption ({', '.join(caption_fields)} as a member or a .json "
                            f"field); its members and fields: {listed}; name it with --caption-column")
