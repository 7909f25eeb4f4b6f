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
    qbnorm: bool = opt(False, "add <method>+qbnorm rows: QB-Norm's dynamic inverted softmax, train-split query "
                              "banks, beta tuned on val")
    dbnorm: bool = opt(False, "add <method>+dbnorm rows: DBNorm's dual inverted softmax, train-split query and "
                              "gallery banks, betas tuned on val")
    coco_1k: bool = opt(False, "also report the COCO 1K protocol (5,000-image split): five consecutive folds of "
                               "1,000 images and their captions, each scored alone, averaged")
    eccv: bool = opt(False, "ECCV Caption, CxC and COCO 5K metrics of every row through the eccv_caption package "
                            "(COCO 5K test split; needs --coco-captions)")
    coco_captions: str | None = opt(None, "COCO captions file with annotation ids (captions_val2014.json) that "
                                          "--eccv matches the split's images and captions to")
    pmrp: str | None = opt(None, "folder with eccv_caption's PMRP files (pm_image_to_caption.json, "
                                 "pm_caption_to_image.json): adds pmrp to --eccv")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (encoding the fused model when its embeddings are missing; "
                              "the --qbnorm and --dbnorm bank passes)")
    memory_gb: float | None = opt(None, "host memory for reading node features when the fused model encodes a split "
                                        "(default 70% of available) and for each --qbnorm/--dbnorm bank pass "
                                        "(default 2 GB); more is read in blocks")

    def __post_init__(self) -> None:
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise PipelineError(f"--memory-gb {self.memory_gb}: need a positive number of GB")
        if self.eccv and not self.coco_captions:
            raise PipelineError("--eccv needs --coco-captions FILE (captions_val2014.json): the package scores COCO "
                                "caption annotation ids, which the split index does not hold")
        for flag, value in (("--coco-captions", self.coco_captions), ("--pmrp", self.pmrp)):
            if value and not self.eccv:
                raise PipelineError(f"{flag} goes with --eccv")

    @property
    def needs_train(self) -> bool:
        """Whether the train split's embeddings are read (the banks of the re-ranking rows)."""
        return self.rerank or self.qbnorm or self.dbnorm

    def to_dict(self) -> dict:
        return asdict(self)
