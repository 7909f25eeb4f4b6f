"""The search config: one frozen dataclass; every field is a `pipeline search` option (the query TEXT is its
argument)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from data.datasets import SPLITS
from data.options import opt

TARGETS = ("images", "captions")
INDEXES = ("auto", "exact", "faiss")


@dataclass(frozen=True)
class SearchConfig:
    run: str = opt(None, "the trained run whose backbones and fused encoder embed the query", required=True)
    image: str | None = opt(None, "search with this image file instead of TEXT")
    target: str | None = opt(None, "what to find: images or captions (default: images for TEXT, captions for "
                                   "--image)", choices=TARGETS)
    dataset: str | None = opt(None, "dataset in the cache to search (default: the run's)")
    split: str = opt("test", "cached split to search (all: the whole collection, if extracted with --split all)",
                     choices=SPLITS)
    top: int = opt(10, "how many results", min=1)
    json: str | None = opt(None, "write the query and its results as JSON here")
    index: str = opt("auto", "exact: every candidate scored, in blocks within --memory-gb; faiss: a cached FAISS "
                             "index (built on first use, its recall against exact search printed); auto: exact up "
                             "to 1,000,000 candidates, faiss above", choices=INDEXES)
    memory_gb: float | None = opt(None, "host memory for candidate embeddings in exact search (default 70% of "
                                        "available); more are scored block by block")
    cache: str = opt("cache", "feature cache folder")
    runs: str = opt("runs", "folder of fusion runs")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (the backbones and the fused encoder)")

    def __post_init__(self) -> None:
        from data.errors import PipelineError

        if self.memory_gb is not None and not self.memory_gb > 0:
            raise PipelineError(f"--memory-gb {self.memory_gb}: need a positive number of GB")

    def to_dict(self) -> dict:
        return asdict(self)
