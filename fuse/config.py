"""The fusion configs: the model's hyperparameters (one dataclass) and the run's recipe around them.

Every field is a `pipeline fuse` option (``ModelConfig``'s fields too: pipeline.py flattens the nested
dataclass), and both are saved with the run. The defaults are HADA-LAVIS's (``Config/*/C1*.yml`` and
``Controller.py``); every option that departs from the reference is off by default and listed in the
README's "Differences from the reference implementation".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from data.backbone_spec import parse_specs
from data.errors import PipelineError
from data.options import flag, opt

# --attention: how the one graph layer is computed (the same numbers to float tolerance). The dense kinds run
# fuse.attention.star_gatv2 with this implementation of its fused passes (None: its default, torch.compile'd
# with an eager fallback, or what FUSE_ATTENTION_IMPL says; on CPU in float32 the compiled kinds run the
# C++ loops of fuse/native.py instead where they build).
ATTENTION = {"dense": None, "dense-eager": "eager", "dense-compiled": "compiled", "pyg": None}


# Options of earlier versions that never changed a run (still in the config.json of runs they made).
RETIRED = frozenset({"data_root"})


@dataclass(frozen=True)
class ModelConfig:
    """HADA's model: widths, heads, dropout, edge weights, momentum encoders, queue, temperature."""

    width: int = opt(512, "node width after each backbone's projection (ft_trans / ft_gcn)")
    heads: int = opt(4, "GATv2 attention heads (concatenated, then merged back to --width)")
    dropout: float = opt(0.4, "dropout: GATv2 attention, before the head merge, the output layer and the ITM head")
    embed_dim: int = opt(512, "fused embedding size (ft_com)")
    w_token_own: float = opt(0.9, "edge weight token -> its own backbone's global node (wfc)")
    w_token_other: float = opt(0.7, "edge weight token -> the other backbones' global nodes (wfcx)")
    w_global: float = opt(1.1, "edge weight global <-> global (wcc)")
    self_loop_weight: float | None = opt(
        None, "deviation: explicit self-loop edge weight; default: the reference's PyG self-loops, whose weight is "
              "the mean of the node's incoming edge weights")
    momentum: float = opt(0.995, "EMA of the momentum encoders")
    queue_size: int = opt(64000, "ITC queue length (filled with random unit vectors at the start, as the reference)")
    temp: float = opt(0.07, "initial ITC temperature (learned, clamped to [0.001, 0.5])")
    weighted: bool = opt(False, "HADA's second stage: score (1 - w) * fused + w * first backbone, w learned "
                                "(start 0.5, clamped to [0.1, 0.9])")
    reference_bug: bool = opt(False, "reproduce HADA-LAVIS's forward bug: the second backbone's graph nodes are "
                                     "rows of the first backbone's (needs exactly two backbones of equal node width)")

    # Fixed by the reference recipe (not options).
    temp_min = 0.001
    temp_max = 0.5
    weight_init = 0.5
    weight_min = 0.1
    weight_max = 0.9

    def __post_init__(self) -> None:
        if min(self.width, self.heads, self.embed_dim, self.queue_size) < 1:
            raise PipelineError("--width, --heads, --embed-dim and --queue-size must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise PipelineError(f"--dropout {self.dropout}: need 0 <= dropout < 1")
        if not 0.0 <= self.momentum <= 1.0:
            raise PipelineError(f"--momentum {self.momentum}: need 0 <= momentum <= 1")
        if not self.temp_min <= self.temp <= self.temp_max:
            raise PipelineError(f"--temp {self.temp}: need {self.temp_min} <= temp <= {self.temp_max}")

    @property
    def edge_weights(self) -> "EdgeWeights":
        return EdgeWeights(self.w_token_own, self.w_token_other, self.w_global, self.self_loop_weight)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FuseConfig:
    """A fusion run: which cache and backbones, the training recipe, and the model."""

    dataset: str | None = opt(None, "dataset in the cache (default: the only one there)")
    backbones: str | None = opt(None, "comma-separated backbones, 2 or more; the first one is the weighted stage's "
                                      "(default: every backbone cached for train and val, in name order)")
    epochs: int = opt(100, "train up to this many epochs (early stopping usually ends sooner)", min=1)
    batch_size: int = opt(40, "positive (image, caption) pairs per step; a last partial batch is dropped", min=1)
    lr: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.02, "AdamW weight decay (temperature and w included, as the reference)")
    t0: int = opt(30, "cosine warm-restart period in epochs (the schedule steps every iteration)", min=1)
    t_mult: int = opt(2, "period multiplier after each restart", min=1)
    eta_min: float = opt(1e-5, "the schedule's lowest learning rate")
    patience: int = opt(5, "stop after this many epochs without a better validation rsum", min=1)
    min_improvement: float = opt(0.1, "a validation rsum (in %) must beat the best by at least this much to count "
                                      "(the reference's 0.001 on its 0-6 scale)")
    clean_prob: float = opt(0.0, "deviation: chance that a visit uses the clean image although augmented views "
                                 "are cached (the reference never trains on clean images; ALBEF-HADA: 0.25)")
    cache: str = opt("cache", "feature cache folder")
    runs: str = opt("runs", "folder for runs")
    run: str | None = opt(None, "run name (default <dataset>-<backbones>)")
    resume: bool = opt(False, "continue the run from its last.pt to --epochs")
    init: str | None = opt(None, "start from this run's best.pt: its encoders and ITM head (HADA's second stage "
                                 "with --weighted); temperature, queues and momentum encoders start afresh")
    init_momentum: bool = opt(False, "deviation: with --init, also start the momentum encoders from the loaded "
                                     "weights (the reference leaves them at their random initialisation)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    attention: str = opt("dense", "how the graph layer is computed, the same model each way: dense (per-sample dense "
                                  "attention from the GATv2 parameters, torch.compile'd: the first run compiles for "
                                  "about a minute; on CPU in float32 hand-written C++ loops, built in a second; "
                                  "eager if compiling fails), dense-eager, dense-compiled, or pyg "
                                  "(GATv2Conv.forward on the edge list, per-edge tensors); the contrastive loss is "
                                  "compiled too, except with dense-eager", choices=tuple(ATTENTION))
    precision: str = opt("fp32", "deviation: bf16 runs the GPU matmuls under bfloat16 autocast (similarities and "
                                 "losses stay fp32); the reference trains in fp32", choices=("fp32", "bf16"))
    seed: int = opt(0, "seed of initialisation, shuffling, view choice, dropout and negatives", min=0, max=2**31 - 1)
    memory_gb: float | None = opt(None, "host memory for cached features (default 70% of available); "
                                        "more than this streams the train split in blocks")
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "t0", "t_mult", "patience"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{flag(name)} {getattr(self, name)}: need >= 1")
        if not 0 <= self.seed < 2**31:
            raise PipelineError(f"--seed {self.seed}: need 0 <= seed < 2**31")
        if not self.lr > 0 or self.eta_min < 0 or self.weight_decay < 0 or self.min_improvement < 0:
            raise PipelineError(f"--lr {self.lr}, --eta-min {self.eta_min}, --weight-decay {self.weight_decay}, "
                                f"--min-improvement {self.min_improvement}: need lr > 0 and the others >= 0")
        if not 0.0 <= self.clean_prob <= 1.0:
            raise PipelineError(f"--clean-prob {self.clean_prob}: need 0 <= P <= 1")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise PipelineError(f"--memory-gb {self.memory_gb}: need a positive number of GB")
        if self.init_momentum and not self.init:
            raise PipelineError("--init-momentum starts the momentum encoders of a second stage from the loaded "
                                "weights: it needs --init RUN")

    @property
    def backbone_list(self) -> list[str]:
        """The backbones' store names (a spec such as open_clip:<model>@<tag> maps to its store folder)."""
        return [spec.store_name for spec in parse_specs(self.backbones or "")]

    @property
    def run_name(self) -> str:
        return self.run or f"{self.dataset}-{'+'.join(self.backbone_list)}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "FuseConfig":
        """The config saved with a run; settings this version does not know are refused by name."""
        saved = {k: v for k, v in saved.items() if k not in RETIRED}
        model = saved.get("model", {})
        unknown = sorted(set(saved) - {f.name for f in fields(cls)}) + \
            sorted(f"model.{k}" for k in set(model) - {f.name for f in fields(ModelConfig)})
        if unknown:
            raise PipelineError(f"the run's saved settings {unknown} are unknown to this version of the pipeline: "
                                f"it was made by another version")
        return cls(**{**saved, "model": ModelConfig(**model)})


@dataclass(frozen=True)
class EdgeWeights:
    """HADA's edge weights (``wfc``, ``wfcx``, ``wcc``; their defaults are ModelConfig's). ``self_loop`` None
    means PyG's ``fill_value='mean'`` self-loops of the reference: a node's self-loop weight is the mean of its
    other incoming edges' weights."""

    token_own: float
    token_other: float
    global_global: float
    self_loop: float | None
