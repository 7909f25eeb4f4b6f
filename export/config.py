"""The export config: one frozen dataclass; every field is a `pipeline export` option, written into export.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from data.datasets import SPLITS
from data.options import opt

DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ExportConfig:
    run: str | None = opt(None, "a fusion run: export its fused embeddings (those `pipeline score` scores, made from "
                                "the run's best checkpoint when missing)")
    backbone: str | None = opt(None, "a backbone spec: export its store's embeddings (clean views)")
    dataset: str | None = opt(None, "dataset name (default: the only one in the cache)")
    split: str = opt(None, "split to export (all: a whole collection extracted with --split all)", choices=SPLITS,
                     required=True)
    out: str = opt(None, "folder to write img_emb/, text_emb/ and metadata/ to (clip-retrieval's layout)",
                   required=True)
    dtype: str = opt("float16", "type of the written embeddings", choices=DTYPES)
    part_size: int = opt(1_000_000, "images per file (img_emb_N.npy, text_emb_N.npy, metadata_N.parquet)", min=1)
    overwrite: bool = opt(False, "replace an export already in --out")
    cache: str = opt("cache", "feature cache folder")
    runs: str = opt("runs", "folder of fusion runs")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (encoding the fused model when its embeddings are missing)")

    def to_dict(self) -> dict:
        return asdict(self)
