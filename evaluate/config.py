"""The scoring config: one frozen dataclass; every field is a `pipeline score` option, written into the JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from data.datasets import SPLITS
from data.errors import PipelineError
from data.options import opt


@dataclass(frozen=True)
class ScoreConfig:
    dataset: str | None = opt(None, "dataset name (default: the only one in the cache)")
    split: str = opt("test", "split to score", choices=SPLITS)
    data_root: str = opt("datasets", "dataset folder (scoring uses the cache only; --gallery looks here for the "
                                     "images when the stores' record of their folder fails)")
    cache: str = opt("cache", "feature cache folder")
    runs: str = opt("runs", "folder of fusion runs")
    run: str | None = opt(None, "run to score (default: the newest run of this dataset, if any)")
    json: str | None = opt(None, "write the table as JSON here (and as markdown beside it)")
    plot: str | None = opt(None, "draw recall@K, K=1..50, both directions, to this PNG")
    sims: tuple[str, ...] = opt((), "score external images x captions similarity matrices (.npy or .pt), "
                                     "repeatable; their late fusion too when several", multiple=True)
    rerank: bool = opt(False, "add rows re-ranked by Nearest Neighbor Normalization (train-split embeddings as bank)")
    gallery: str | None = opt(None, "write an HTML page here: sampled queries with each method's top 5 side by "
                                    "side, the ground truth marked, and how often hada fixes or breaks a top-1")
    gallery_queries: int = opt(12, "queries per direction on the --gallery page (drawn at random, seed 0)", min=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (encoding the fused model when its embeddings are missing)")
    memory_gb: float | None = opt(None, "host memory for reading node features when the fused model encodes a split "
                                        "(default 70% of available); more is read in blocks")

    def __post_init__(self) -> None:
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise PipelineError(f"--memory-gb {self.memory_gb}: need a positive number of GB")

    def to_dict(self) -> dict:
        return asdict(self)
