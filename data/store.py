"""The feature store: HDF5 shards of one backbone's outputs for one split, with a manifest.

Layout: ``<cache>/<dataset>/<split>/<backbone>/{images,texts}-NNNNN.h5`` plus ``manifest.json``.
Every shard holds ``ids`` (int64 rows of the split index), optionally ``view`` (int8, 0 = clean
image, k = k-th augmented view), ``embeds`` (N x D float32, L2-normalised retrieval embedding),
``norms`` (N float32, the norm before normalising), ``tokens`` (all rows' node features stacked,
float16; row 0 of a sample is its global node) and ``offsets`` (N+1 int64). Image shards of a backbone
that scores with several embeddings per image (BLIP-2: one per Q-Former query) also hold the optional
``query_embeds`` (N x Q x D float32, each row L2-normalised); the backbone-alone score is then the best
query's cosine, while ``embeds``/``norms`` hold the one vector per sample that the fusion takes. A shard
is written under a temporary name and renamed when complete; its ``complete`` attribute is set last.

One process writes a store at a time (``FeatureStore.writing``: a lock held for the whole write). A store's
*settings* are its fingerprint minus what may differ between the splits of one backbone (``SPLIT_KEYS``): the
stores of one backbone that a run trains, selects epochs and scores on must all have the same settings.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from data.atomic import atomic_path, read_json, write_json
from data.errors import PipelineError
from data.lock import exclusive

SCHEMA_VERSION = 1
KINDS = ("images", "texts")
# Fingerprint keys that legitimately differ between the splits of one backbone: augmented views (train only)
# and the split index the store was made from.
SPLIT_KEYS = frozenset({"views", "view_seed", "augmentation", "index_version"})


@dataclass
class ShardData:
    """Rows of one shard (or of a whole store, concatenated)."""

    ids: np.ndarray
    embeds: np.ndarray
    norms: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray | None = None
    view: np.ndarray | None = None
    query_embeds: np.ndarray | None = None  # N x Q x D, L2-normalised per query (optional: BLIP-2 images)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def raw_embeds(self) -> np.ndarray:
        """The backbone's unnormalised projection (what HADA's output layer takes)."""
        return self.embeds * self.norms[:, None]


def sample_bytes(node_rows: float, token_dim: int, embed_dim: int, query_rows: int = 0) -> int:
    """Bytes one sample takes in a shard: float16 node rows, float32 embeds (and query_embeds), norm, id, offset."""
    return int(node_rows * token_dim * 2 + (1 + query_rows) * embed_dim * 4 + 4 + 8 + 8)


def shard_name(kind: str, number: int) -> str:
    return f"{kind}-{number:05d}.h5"


def _attr(value):
    """HDF5 attributes take scalars and strings; store anything else as its repr."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)  # also turns numpy strings into the variable-length strings h5py stores


def write_shard(path: Path, data: ShardData, attrs: dict) -> int:
    """Write atomically; returns the bytes on disk."""
    if data.tokens is not None and data.offsets[-1] != len(data.tokens):
        raise ValueError(f"{path.name}: offsets end at {data.offsets[-1]} but there are {len(data.tokens)} token rows")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=data.ids.astype(np.int64))
            if data.view is not None:
                f.create_dataset("view", data=data.view.astype(np.int8))
            f.create_dataset("embeds", data=data.embeds.astype(np.float32))
            f.create_dataset("norms", data=data.norms.astype(np.float32))
            if data.query_embeds is not None:
                f.create_dataset("query_embeds", data=data.query_embeds.astype(np.float32))
            f.create_dataset("offsets", data=data.offsets.astype(np.int64))
            tokens = data.tokens if data.tokens is not None else np.zeros((0, 0), np.float16)
            f.create_dataset("tokens", data=tokens.astype(np.float16), chunks=True if len(tokens) else None)
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)
            f.attrs["schema"] = SCHEMA_VERSION
            f.attrs["rows"] = len(data)
            f.attrs["complete"] = True  # set last: a shard without it was cut off
        return os.path.getsize(tmp)


def shard_is_complete(path: Path, fingerprint: dict) -> bool:
    """True if the shard exists, was closed complete, and was made with this configuration."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                return False
            return all(f.attrs.get(k) == _attr(v) for k, v in fingerprint.items())
    except OSError:
        return False


def read_rows(path: Path) -> int:
    """Rows in a shard."""
    with h5py.File(path, "r") as f:
        return len(f["ids"])


def read_shard_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def describe_difference(old: dict, new: dict, labels: tuple[str, str] = ("stored", "now")) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} ({labels[0]}) vs {new.get(k)!r} ({labels[1]})"
                     for k in keys if old.get(k) != new.get(k))


def store_settings(fingerprint: dict) -> dict:
    """The settings of a store that must be equal across the splits of one backbone (its fingerprint without
    ``SPLIT_KEYS``)."""
    return {k: v for k, v in fingerprint.items() if k not in SPLIT_KEYS}


def check_settings(expected: dict, store: "FeatureStore", backbone: str, split: str, source: str) -> None:
    """Refuse ``store`` when its settings differ from ``expected`` (those of ``source``, e.g. "run r's"), in one
    line naming the backbone, the split and each differing setting."""
    refuse_other_settings(expected, store.settings(), backbone, split, source, f"the store at {store.root}")


def refuse_other_settings(expected: dict, actual: dict, backbone: str, split: str, source: str, what: str) -> None:
    """``check_settings`` for settings already read (``what`` names where ``actual`` come from)."""
    if actual != expected:
        raise PipelineError(f"backbone {backbone}, split {split}: {what} was made with other settings than "
                            f"{source}: {describe_difference(expected, actual, (source, split))}. Re-extract it "
                            f"with the same settings, or use another --cache")


def common_settings(names: list[str], stores_by_split: dict[str, list["FeatureStore"]]) -> dict[str, dict]:
    """Each backbone's store settings, refusing a backbone whose stores differ between the splits given (checked
    against the first split's: a model trained on one kind of feature must not be selected or scored on another)."""
    first, *others = stores_by_split
    settings = {name: store.settings() for name, store in zip(names, stores_by_split[first])}
    for split in others:
        for name, store in zip(names, stores_by_split[split]):
            check_settings(settings[name], store, name, split, first)
    return settings


READ_CHUNK = 1024  # rows per read when a load skips rows (augmented views)


@contextlib.contextmanager
def _complete_shard(path: Path) -> Iterator[h5py.File]:
    """A shard open for reading; an incomplete or unreadable one is refused by name."""
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise PipelineError(f"shard {path} is incomplete: rerun `pipeline extract` to redo it")
            yield f
    except OSError as e:
        raise PipelineError(f"shard {path} cannot be read ({e}): remove it and rerun `pipeline extract`") from None


def token_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices of the token rows of samples whose rows start at ``starts`` and number ``counts``, concatenated."""
    before = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return np.repeat(starts - before, counts) + np.arange(int(np.sum(counts)), dtype=np.int64)


def _read_rows(f, out: ShardData, lo: int, hi: int, offs: np.ndarray, row: int, tok: int, tokens: bool,
               keep: np.ndarray | None = None) -> tuple[int, int]:
    """Copy shard rows lo:hi (``keep``: a mask over them) into ``out`` at row ``row`` and token row ``tok``.

    ``offs``: the shard's token offsets of rows lo..hi. Returns the next (row, token row)."""
    counts = np.diff(offs)
    if keep is None:
        m, t = hi - lo, int(offs[-1] - offs[0])
        take = slice(None)
    else:
        m, t = int(keep.sum()), int(counts[keep].sum())
        take = keep
    if not m:
        return row, tok
    for name, dest in (("ids", out.ids), ("embeds", out.embeds), ("norms", out.norms), ("view", out.view),
                       ("query_embeds", out.query_embeds)):
        if dest is not None:
            dest[row:row + m] = f[name][lo:hi][take]
    out.offsets[row + 1:row + m + 1] = tok + np.cumsum(counts[take])
    if tokens and t:
        if keep is None:
            f["tokens"].read_direct(out.tokens, np.s_[offs[0]:offs[-1]], np.s_[tok:tok + t])
        else:
            block = f["tokens"][offs[0]:offs[-1]]
            out.tokens[tok:tok + t] = block[token_rows(offs[:-1][keep] - offs[0], counts[keep])]
    return row + m, tok + t


class FeatureStore:
    """One backbone's store for one split: shards plus ``manifest.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def at(cls, cache: str | Path, dataset: str, split: str, name: str) -> "FeatureStore":
        return cls(Path(cache) / dataset / split / name)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise PipelineError(f"no feature store at {self.root}: run `pipeline extract` for it first")
        return read_json(self.manifest_path)

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def settings(self) -> dict:
        """The store's settings (``store_settings`` of its fingerprint)."""
        return store_settings(self.manifest()["fingerprint"])

    def content_key(self) -> str:
        """What the store holds now, beyond its settings: its manifest's shards and excluded images, and each shard
        file as it is on disk (name, size, modification time). A store re-extracted in place (a repaired image, a
        shard redone) gets a new key, so what was derived from it (fused embeddings, an index) is made again."""
        manifest = self.manifest()
        shards = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for kind in KINDS for p in self.shard_paths(kind)]
        blob = json.dumps({"fingerprint": manifest["fingerprint"], "bad_images": manifest.get("bad_images", []),
                           "shards": shards}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def writing(self, advice: str = "wait for it to finish, or use another --cache") -> Iterator[None]:
        """Hold the store's lock for a whole write; another writer is refused at once, naming its pid and host
        (and ``advice``: what the user can do).

        Temporary files left by a writer that died (a killed run) are removed here, under the lock, so a live
        writer's are never touched.
        """
        with exclusive(self.root, f"the store {self.root}", advice):
            for stale in self.root.glob(".*.tmp"):
                stale.unlink()
            yield

    def check(self, fingerprint: dict) -> dict | None:
        """The store's manifest (None if there is no store yet); a store made with another configuration is
        refused (nothing is written)."""
        if not self.exists():
            return None
        manifest = self.manifest()
        if manifest["fingerprint"] != fingerprint:
            raise PipelineError(
                f"the store at {self.root} was made with another configuration: "
                f"{describe_difference(manifest['fingerprint'], fingerprint)}. "
                f"Use another --cache or remove that folder.")
        return manifest

    def claim(self, fingerprint: dict, shard_size: int | None = None, **extra) -> dict:
        """Open for writing with this configuration (call it inside ``writing()``); refuse a store made with another.

        ``shard_size`` is recorded, not compared: the caller keeps a store's own (extract.run.shard_size), or
        sets a new one while the store has no shard yet. ``extra`` (e.g. the backbone spec) is recorded beside.
        """
        manifest = self.check(fingerprint)
        if manifest is not None:
            update = {**({"shard_size": shard_size} if shard_size is not None else {}), **extra}
            if any(manifest.get(k) != v for k, v in update.items()):
                manifest = {**manifest, **update}
                write_json(self.manifest_path, manifest)
            return manifest
        manifest = {"schema": SCHEMA_VERSION, "fingerprint": fingerprint, "complete": False, "shard_size": shard_size,
                    **extra}
        write_json(self.manifest_path, manifest)
        return manifest

    def finish(self, manifest: dict) -> None:
        write_json(self.manifest_path, {**manifest, "complete": True})

    def shard_paths(self, kind: str) -> list[Path]:
        manifest = self.manifest()
        if not manifest.get("complete"):
            raise PipelineError(f"the store at {self.root} is incomplete: rerun `pipeline extract` to finish it")
        return [self.root / name for name in manifest["shards"][kind]]

    def load(self, kind: str, tokens: bool = True, id_range: tuple[int, int] | None = None,
             queries: bool = False, clean: bool = False) -> ShardData:
        """Rows of one kind in split-index order; ``id_range=(a, b)`` keeps rows with a <= id < b.

        ``queries=True`` also reads ``query_embeds`` where the shards have them; ``clean=True`` keeps only the
        clean view of each image (augmented views are skipped while reading, never held).

        Reads straight into preallocated arrays, so peak memory is the result itself (no concatenation), plus
        one chunk of ``READ_CHUNK`` rows when views are skipped.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        plan = []  # (path, first row, last row, token offsets of rows lo..hi, rows kept among lo:hi or None)
        for path in self.shard_paths(kind):
            with _complete_shard(path) as f:
                n = len(f["ids"])
                if id_range is not None and (n == 0 or f["ids"][n - 1] < id_range[0] or f["ids"][0] >= id_range[1]):
                    continue  # no row in the range: its ids are not read
                ids = f["ids"][:]
                lo, hi = (0, len(ids)) if id_range is None else np.searchsorted(ids, id_range)
                keep = f["view"][lo:hi] == 0 if clean and "view" in f else None
                if hi > lo and (keep is None or keep.any()):
                    plan.append((path, int(lo), int(hi), f["offsets"][lo:hi + 1], keep))
        if not plan:
            raise PipelineError(f"{self.root}: no {kind} rows" + (f" with ids in {id_range}" if id_range else ""))
        with h5py.File(plan[0][0], "r") as f:
            dims, width, has_view = f["embeds"].shape[1], f["tokens"].shape[1], "view" in f
            query_shape = f["query_embeds"].shape[1:] if queries and "query_embeds" in f else None
        n = sum(hi - lo if keep is None else int(keep.sum()) for _, lo, hi, _, keep in plan)
        t = sum(int(np.diff(offs)[keep].sum()) if keep is not None else int(offs[-1] - offs[0])
                for _, _, _, offs, keep in plan)
        out = ShardData(ids=np.empty(n, np.int64), embeds=np.empty((n, dims), np.float32),
                        norms=np.empty(n, np.float32), offsets=np.zeros(n + 1, np.int64),
                        tokens=np.empty((t, width), np.float16) if tokens else None,
                        view=np.empty(n, np.int8) if has_view else None,
                        query_embeds=np.empty((n, *query_shape), np.float32) if query_shape else None)
        row = tok = 0
        for path, lo, hi, offs, keep in plan:
            with h5py.File(path, "r") as f:
                if keep is None:
                    row, tok = _read_rows(f, out, lo, hi, offs, row, tok, tokens)
                    continue
                for a in range(lo, hi, READ_CHUNK):  # views skipped chunk by chunk
                    b = min(a + READ_CHUNK, hi)
                    row, tok = _read_rows(f, out, a, b, offs[a - lo:b - lo + 1], row, tok, tokens,
                                          keep[a - lo:b - lo])
        return out

    def embed_blocks(self, kind: str, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, embeds) of one kind's clean rows, at most ``rows`` at a time, shard by shard (bounded memory)."""
        for path in self.shard_paths(kind):
            with h5py.File(path, "r") as f:
                for a in range(0, len(f["ids"]), rows):
                    ids, embeds = f["ids"][a:a + rows], f["embeds"][a:a + rows]
                    if "view" in f:
                        clean = f["view"][a:a + rows] == 0
                        ids, embeds = ids[clean], embeds[clean]
                    yield ids, embeds

    def dims(self, kind: str) -> tuple[int, int]:
        """(node width, embedding size) of one kind's rows, read from a shard that has rows (a shard whose images
        were all excluded with --skip-bad has none)."""
        for path in self.shard_paths(kind):
            with h5py.File(path, "r") as f:
                if len(f["ids"]):
                    return int(f["tokens"].shape[1]), int(f["embeds"].shape[1])
        raise PipelineError(f"{self.root}: no {kind} rows (every one was excluded at extraction)")

    def nbytes(self, kind: str) -> int:
        """Bytes the token features of one kind take in memory (float16)."""
        total = 0
        for path in self.shard_paths(kind):
            with h5py.File(path, "r") as f:
                total += f["tokens"].size * 2 + f["embeds"].size * 4
        return total

    def clean_image_ids(self) -> np.ndarray:
        """Rows of the clean image views (view 0) in the store, in order, read without their features."""
        parts = []
        for path in self.shard_paths("images"):
            with _complete_shard(path) as f:
                ids = f["ids"][:]
                parts.append(ids[f["view"][:] == 0] if "view" in f else ids)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def bad_images(self) -> list[int]:
        return [b["id"] for b in self.manifest().get("bad_images", [])]
