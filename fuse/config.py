"""The fusion config: one frozen dataclass; every field is a `pipeline fuse` option, saved with the run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from data.options import opt


@dataclass(frozen=True)
class FuseConfig:
    dataset: str | None = opt(None, "dataset whose train and val caches to read (default: the only one in the cache)")
    backbones: str | None = opt(None, "comma-separated backbones, 2 or more; the first one is the weighted stage's "
                                      "(default: every backbone cached for train and val, in name order)")
    epochs: int = opt(20, "train up to this many epochs (early stopping may end sooner)")
    batch_size: int = opt(128, "positive (image, caption) pairs per step (HADA: 40)")
    lr: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.02, "AdamW weight decay")
    t0: int = opt(30, "cosine warm-restart period in epochs")
    t_mult: int = opt(2, "period multiplier after each restart")
    patience: int = opt(5, "stop after this many epochs without a better validation rsum")
    clean_prob: float = opt(0.25, "chance that a visit uses the clean image rather than a cached augmented view")
    data_root: str = opt("datasets", "dataset folder (only read when a split index is missing)")
    cache: str = opt("cache", "feature cache folder")
    runs: str = opt("runs", "folder for runs")
    run: str | None = opt(None, "run name (default <dataset>-<backbones>)")
    resume: bool = opt(False, "continue the run from its last.pt to --epochs")
    init: str | None = opt(None, "start from this run's best.pt (HADA's second stage with --weighted)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    seed: int = opt(0, "seed of initialisation, shuffling, view choice, dropout and negatives")
    memory_gb: float | None = opt(None, "host memory for cached features (default 70% of available); "
                                        "more than this streams the train split in blocks")
    width: int = opt(512, "common node width")
    heads: int = opt(4, "GATv2 attention heads")
    dropout: float = opt(0.4, "dropout")
    embed_dim: int = opt(512, "fused embedding size")
    w_token_own: float = opt(0.9, "edge weight token -> own global node")
    w_token_other: float = opt(0.7, "edge weight token -> other backbones' global nodes")
    w_global: float = opt(1.1, "edge weight global <-> global")
    w_self: float = opt(1.0, "self-loop weight")
    undirected: bool = opt(False, "add the reverse of every edge")
    momentum: float = opt(0.995, "EMA of the momentum encoders")
    queue_size: int = opt(65536, "ITC queue length")
    temp: float = opt(0.07, "initial ITC temperature (learned, clamped to [0.001, 0.5])")
    weighted: bool = opt(False, "HADA's second stage: mix the fused score with the first backbone's "
                                "by a learned weight")
    global_only: bool = opt(True, "compute graph outputs for global nodes only (exact, faster)")

    @property
    def backbone_list(self) -> list[str]:
        return [b.strip() for b in self.backbones.split(",") if b.strip()]

    @property
    def run_name(self) -> str:
        return self.run or f"{self.dataset}-{'+'.join(self.backbone_list)}"

    def model_config(self):
        from fuse.model import ModelConfig  # imported here: the CLI builds this config without torch

        names = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)
