"""Stage three: recall of every backbone alone, their late fusion and the fused model, from cached embeddings."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.atomic import read_json
from data.coco_ids import read_coco_ids
from data.device import pick_device
from data.errors import PipelineError
from data.index import SplitIndex, index_path
from data.store import FeatureStore, check_settings
from data.torch_files import load_pt
from evaluate.bank_rows import METHODS as BANK_METHODS
from evaluate.bank_rows import BankRows, Side
from evaluate.config import ScoreConfig
from evaluate.coverage import Coverage
from evaluate.eccv import EccvMetrics
from evaluate.late_fusion import late_fusion_similarities, tune_weights
from evaluate.protocols import FOLD_IMAGES, FOLDS, Part, Protocols, Scores, part_of, ranks_of
from evaluate.recall import recall_curve, recalls_from_ranks, retrieval_ranks, retrieval_ranks_from_embeddings
from evaluate.rerank import ALPHA, nnn_similarities, tune_alpha

log = logging.getLogger("pipeline.score")
DEFAULT_MEMORY_GB = 2.0  # the bank passes' budget until a --memory-gb says otherwise


@dataclass
class Embeddings:
    """One method's retrieval embeddings of a split: present image ids, image rows, caption rows."""

    name: str
    image_ids: np.ndarray
    images: torch.Tensor
    texts: torch.Tensor
    random_init: bool = False
    queries: torch.Tensor | None = None  # N x Q x D per-query image embeddings (BLIP-2): scored by the best query

    def similarities(self, ids: np.ndarray | None = None, captions: torch.Tensor | None = None) -> torch.Tensor:
        """images x captions scores as the backbone ranks: cosine, or the best query's cosine where stored.

        ids: the split's image rows to score (default: all present); captions: caption rows (default: all)."""
        rows = slice(None) if ids is None else torch.from_numpy(np.searchsorted(self.image_ids, ids))
        texts = self.texts if captions is None else self.texts[captions]
        if self.queries is None:
            return self.images[rows] @ texts.T
        queries = self.queries[rows]
        sims = queries[:, 0] @ texts.T
        for q in range(1, queries.shape[1]):  # one query at a time: memory stays images x captions
            sims = torch.maximum(sims, queries[:, q] @ texts.T)
        return sims

    def scores(self) -> Scores:
        """Its scores on any part of the split (top-K lists from the embeddings, block by block, when single)."""
        def block(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
            ids = None if part.images is None else self.image_ids[part.images.numpy()]
            s = self.similarities(ids, part.captions)
            return s, s

        return Scores(self.image_ids, block, (self.images, self.texts) if self.queries is None else None)


def read_embeddings(store: FeatureStore, name: str, index: SplitIndex, queries: bool = True) -> Embeddings:
    """Clean-view embeddings of a store (no node features; ``queries``: also per-query ones where stored),
    refusing one made from another version of the split index."""
    manifest = store.manifest()
    version = manifest["fingerprint"].get("index_version")
    if version != index.version:
        raise PipelineError(f"{store.root} was made from split index version {version}, but the cache's "
                            f"{index.dataset}/{index.split} index is version {index.version}: "
                            f"re-extract or re-encode it")
    images = store.load("images", tokens=False, queries=queries, clean=True)
    texts = store.load("texts", tokens=False)
    if len(texts) != len(index.captions):
        raise PipelineError(f"{store.root} holds {len(texts)} captions, the split index {len(index.captions)}")
    random_init = str(manifest["fingerprint"].get("checkpoint", "")).startswith("random-init")
    per_query = torch.from_numpy(images.query_embeds) if images.query_embeds is not None else None
    return Embeddings(name, images.ids, torch.from_numpy(images.embeds), torch.from_numpy(texts.embeds),
                      random_init, per_query)


def backbone_names(cache: str, dataset: str, split: str) -> list[str]:
    root = Path(cache) / dataset / split
    return sorted(p.parent.name for p in root.glob("*/manifest.json"))


def latest_run(runs: str, dataset: str) -> str | None:
    """The newest run (by its best checkpoint) trained on ``dataset``."""
    found = []
    for config in Path(runs).glob("*/config.json"):
        if read_json(config)["config"]["dataset"] == dataset and (config.parent / "best.pt").is_file():
            found.append(((config.parent / "best.pt").stat().st_mtime, config.parent.name))
    return max(found)[1] if found else None


def run_backbones(runs: str, run: str, dataset: str) -> list[str]:
    """The backbones a run fused, refusing a run trained on another dataset."""
    path = Path(runs) / run / "config.json"
    if not path.is_file():
        raise PipelineError(f"no run {run!r} in {runs} (no {path})")
    saved = read_json(path)
    if saved["config"]["dataset"] != dataset:
        raise PipelineError(f"run {run!r} was trained on dataset {saved['config']['dataset']!r}, not {dataset!r}: "
                            f"pass --dataset {saved['config']['dataset']} or another --run")
    return saved["backbones"]


@dataclass
class SplitEmbeddings:
    index: SplitIndex
    methods: list[Embeddings]

    def coverage(self, ids: np.ndarray) -> Coverage:
        return Coverage(ids, self.index.text_to_image, len(self.index.images))

    def common_ids(self, methods: list[Embeddings] | None = None) -> np.ndarray:
        methods = methods or self.methods
        ids = methods[0].image_ids
        for e in methods[1:]:
            ids = np.intersect1d(ids, e.image_ids)
        return ids


def cached_for(cfg: ScoreConfig, split: str, names: list[str]) -> bool:
    """True when the split's index and a store of every backbone are in the cache."""
    return index_path(cfg.cache, cfg.dataset, split).is_file() and all(
        FeatureStore.at(cfg.cache, cfg.dataset, split, name).exists() for name in names)


def load_embeddings(cfg: ScoreConfig, split: str, names: list[str], fused_root: Path | None,
                    settings: dict[str, dict] | None = None, source: str = "",
                    queries: bool = True) -> SplitEmbeddings | None:
    """Every backbone's (and the fused model's) embeddings of a split; None if it is not cached for all.

    ``settings``: each backbone's store settings that the split's stores must have (those of ``source``, e.g. the
    scored split's stores: one table never mixes features made with different settings)."""
    if not cached_for(cfg, split, names):
        return None
    index = SplitIndex.load(index_path(cfg.cache, cfg.dataset, split))
    methods = []
    for name in names:
        store = FeatureStore.at(cfg.cache, cfg.dataset, split, name)
        if settings is not None:
            check_settings(settings[name], store, name, split, source)
        methods.append(read_embeddings(store, name, index, queries))
    if fused_root is not None:
        if not (Path(fused_root) / "manifest.json").is_file():
            return None
        methods.append(read_embeddings(FeatureStore(fused_root), "hada", index))
    return SplitEmbeddings(index, methods)


class Scorer:
    """Rows of the table and recall curves; ranks mapped to index order (absent images are misses)."""

    def __init__(self, split: SplitEmbeddings, protocols: Protocols | None = None):
        self.split, self.protocols = split, protocols
        self.rows, self.curves, self.notes, self.ranks = [], {}, {}, {}

    def add(self, method: str, i2t: np.ndarray, t2i: np.ndarray, scores: Scores | None = None) -> None:
        """A row from its ranks; ``scores`` lets the other protocols asked for (COCO 1K, ECCV) score it too."""
        self.ranks[method] = (i2t, t2i)  # in index order; the gallery (evaluate/gallery.py) reads them
        row = {"method": method, **recalls_from_ranks(i2t, t2i)}
        if self.protocols is not None and scores is not None:
            self.protocols.add(row, scores)
        self.rows.append(row)
        self.curves[method] = {"i2t": recall_curve(i2t).tolist(), "t2i": recall_curve(t2i).tolist()}

    def plain(self, emb: Embeddings) -> None:
        """Block by block from the embeddings (memory bounded whatever the split's size); per-query ones whole."""
        cov = self.split.coverage(emb.image_ids)
        if emb.queries is not None:
            self.add_computed(emb.name, emb.scores())
            return
        self.add(emb.name, *cov.expand(*retrieval_ranks_from_embeddings(emb.images, emb.texts, cov.local_t2i)),
                 emb.scores())

    def result(self, dataset: str, split: str, run: str) -> dict:
        """The table's rows, curves and notes (and the COCO 1K rows and curves when asked for); each method's ranks
        and the split's embeddings, for the gallery."""
        out = {"dataset": dataset, "split": split, "run": run, "rows": self.rows, "curves": self.curves,
               "notes": self.notes, "ranks": self.ranks, "embeddings": self.split}
        if self.protocols is not None:
            self.notes.update(self.protocols.notes)
            if self.protocols.folds is not None:
                out.update(coco_1k=self.protocols.rows_1k, curves_1k=self.protocols.curves_1k)
        return out

    def late_fusion(self, backbones: list[Embeddings], weights, method: str = "late-fusion") -> None:
        ids = self.split.common_ids(backbones)

        def block(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
            sub = ids if part.images is None else ids[part.images.numpy()]
            return late_fusion_similarities([e.similarities(sub, part.captions) for e in backbones], weights)

        self.add_computed(method, Scores(ids, block))

    def rerank(self, emb: Embeddings, bank: Embeddings, alpha: float) -> None:
        cov = self.split.coverage(emb.image_ids)
        for_i2t, for_t2i = nnn_similarities(emb.images, emb.texts, bank.images, bank.texts, alpha=alpha)
        self.add(f"{emb.name}+rerank", *cov.expand(*ranks_of(for_i2t, for_t2i, cov.local_t2i)),
                 Scores.of_matrices(emb.image_ids, for_i2t, for_t2i))

    def bank_norm(self, emb: Embeddings, rows: BankRows, method: str) -> None:
        """A QB-Norm or DBNorm row (``method``) of one method, its settings tuned by ``rows``."""
        self.add_computed(f"{emb.name}+{method}", rows.scores(method, emb.image_ids))

    def add_computed(self, method: str, scores: Scores) -> None:
        """A row from scores over the images ``scores.present``, computed whole once: ranked here, and the same
        matrices kept for the other protocols (COCO 1K, ECCV)."""
        cov = self.split.coverage(scores.present)
        whole, scores = scores.computed()
        self.add(method, *cov.expand(*ranks_of(*whole, cov.local_t2i)), scores)


def tuned_late_fusion_weights(val: SplitEmbeddings, names: list[str]) -> tuple[float, ...]:
    """Late-fusion weights with the best val rsum (grid step 0.1 on the simplex)."""
    backbones = [e for e in val.methods if e.name in names]
    ids = val.common_ids(backbones)
    cov = val.coverage(ids)
    return tune_weights([e.similarities(ids) for e in backbones], cov.local_t2i, expand=cov.expand)


def tuned_alpha(val: SplitEmbeddings | None, emb_name: str, bank: Embeddings) -> float:
    if val is None:
        return ALPHA
    emb = next(e for e in val.methods if e.name == emb_name)
    cov = val.coverage(emb.image_ids)
    return tune_alpha(emb.images, emb.texts, cov.local_t2i, bank.images, bank.texts, expand=cov.expand)


def protocols_for(cfg: ScoreConfig, index: SplitIndex) -> Protocols | None:
    """The COCO 1K and ECCV Caption scorers that --coco-1k and --eccv ask for (None: neither)."""
    where = f"{index.dataset}/{index.split}"
    if cfg.coco_1k and len(index.images) != FOLDS * FOLD_IMAGES:
        raise PipelineError(f"--coco-1k needs a split of 5,000 images (COCO 5K test), but {where} has "
                            f"{len(index.images):,}")
    eccv = None
    if cfg.eccv:
        ids = read_coco_ids(cfg.coco_captions, index)
        eccv = EccvMetrics(ids.images, ids.captions, where, cfg.pmrp)
    if not (cfg.coco_1k or eccv):
        return None
    return Protocols(index.text_to_image, len(index.images), cfg.coco_1k, eccv)


def train_bank(cfg: ScoreConfig, names: list[str], fused: dict[str, Path], settings: dict[str, dict],
               source: str) -> SplitEmbeddings:
    """Every method's train-split embeddings (one per sample, clean views): the banks of --rerank, --qbnorm and
    --dbnorm; the train stores must have ``settings`` (those of ``source``)."""
    train = load_embeddings(cfg, "train", names, fused.get("train"), settings, source, queries=False)
    if train is None:
        flags = ", ".join(f for f, on in (("--rerank", cfg.rerank), ("--qbnorm", cfg.qbnorm),
                                          ("--dbnorm", cfg.dbnorm)) if on)
        raise PipelineError(f"{flags} need the train split cached for every method (its embeddings are the bank)")
    return train


def memory_budget(cfg: ScoreConfig) -> int:
    """Bytes a bank pass may hold: --memory-gb, else DEFAULT_MEMORY_GB."""
    return int((cfg.memory_gb or DEFAULT_MEMORY_GB) * 2 ** 30)


def bank_norm_rows(scorer: Scorer, cfg: ScoreConfig, test: SplitEmbeddings, val: SplitEmbeddings | None,
                   train: SplitEmbeddings) -> None:
    """The +qbnorm and +dbnorm rows of every method, banks from the train split, betas tuned on val."""
    methods = [m for m in BANK_METHODS if getattr(cfg, m)]
    folds = scorer.protocols.folds if scorer.protocols is not None else None
    device = pick_device(cfg.device)
    for emb, bank in zip(test.methods, train.methods):
        v = next((e for e in val.methods if e.name == emb.name), None) if val is not None else None
        val_side = Side(v.images, v.texts, val.coverage(v.image_ids).local_t2i) if v is not None else None
        local_folds = None if folds is None else \
            [(np.flatnonzero(np.isin(emb.image_ids, images)), captions) for images, captions in folds]
        rows = BankRows(emb.name, Side(emb.images, emb.texts), Side(bank.images, bank.texts), val_side, methods,
                        local_folds, memory_budget(cfg), device)
        for method, setting in rows.tune().items():
            scorer.notes.setdefault(f"{method}_betas", {})[emb.name] = setting
        for method in methods:
            scorer.bank_norm(emb, rows, method)


def run_score(cfg: ScoreConfig, names: list[str], run: str | None, fused: dict[str, Path]) -> dict:
    """The score table for ``cfg.split``: backbones alone, late fusion (tuned on val), hada, optional NNN rows."""
    test = load_embeddings(cfg, cfg.split, names, fused.get(cfg.split))
    if test is None:
        raise PipelineError(f"{cfg.dataset}/{cfg.split} is not cached for every backbone of {', '.join(names)}: "
                            f"run `pipeline extract` for it first")
    scorer = Scorer(test, protocols_for(cfg, test.index))
    backbones = [e for e in test.methods if e.name in names]
    for emb in backbones:
        scorer.plain(emb)
    settings = {name: FeatureStore.at(cfg.cache, cfg.dataset, cfg.split, name).settings() for name in names}
    source = f"the {cfg.split} store"
    val = load_embeddings(cfg, "val", names, fused.get("val"), settings, source) if cfg.split != "val" else test
    if cfg.split == "val":
        scorer.notes["tuned_on_val"] = ("this table scores the val split, where the late-fusion weights, the NNN "
                                        "alpha and the run's best epoch were chosen: optimistic; report test")
    if len(backbones) > 1:
        if val is None:
            scorer.notes["late-fusion"] = "skipped: the val split is not cached for every backbone"
        else:
            weights = tuned_late_fusion_weights(val, names)
            scorer.notes["late_fusion_weights"] = dict(zip(names, weights))
            log.info("late-fusion weights tuned on val: %s", ", ".join(f"{n} {w:.1f}" for n, w in zip(names, weights)))
            scorer.late_fusion(backbones, weights)
    hada = [e for e in test.methods if e.name == "hada"]
    if hada:
        scorer.plain(hada[0])
    train = train_bank(cfg, names, fused, settings, source) if cfg.needs_train else None
    if cfg.rerank:
        for emb, bank in zip(test.methods, train.methods):
            alpha = tuned_alpha(val, emb.name, bank)
            scorer.notes.setdefault("rerank_alpha", {})[emb.name] = alpha
            scorer.rerank(emb, bank, alpha)
    if cfg.qbnorm or cfg.dbnorm:
        bank_norm_rows(scorer, cfg, test, val, train)
    if any(e.random_init for e in test.methods):
        scorer.notes["random_init"] = ("backbones with random-initialised weights: these figures show the pipeline "
                                       "working, not the backbones' real retrieval quality")
    return scorer.result(cfg.dataset, cfg.split, run or "")


def load_matrix(path: str, shape: tuple[int, int]) -> torch.Tensor:
    """An images x captions matrix from .npy (allow_pickle=False) or .pt (weights_only=True), shape checked."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"--sims {path}: no such file")
    try:
        if p.suffix == ".npy":
            sims = torch.from_numpy(np.load(p, allow_pickle=False))
        elif p.suffix in (".pt", ".pth"):
            sims = load_pt(p, "--sims")
        else:
            raise PipelineError(f"--sims {path}: use a .npy or .pt file")
    except (ValueError, OSError, RuntimeError) as e:
        raise PipelineError(f"--sims {path}: cannot be read safely ({e})") from None
    if not torch.is_tensor(sims) or tuple(sims.shape) != shape:
        got = tuple(sims.shape) if torch.is_tensor(sims) else type(sims).__name__
        raise PipelineError(f"--sims {path}: shape {got}, expected {shape} (images, captions) in split-index order")
    return sims.float()


def score_external(cfg: ScoreConfig, index: SplitIndex) -> dict:
    """Rows for similarity matrices computed elsewhere, and their late fusion (equal weights: no val matrices)."""
    for flag, value in (("--run", cfg.run), ("--rerank", cfg.rerank), ("--qbnorm", cfg.qbnorm),
                        ("--dbnorm", cfg.dbnorm), ("--gallery", cfg.gallery)):
        if value:
            raise PipelineError(f"{flag} cannot be combined with --sims: --sims scores the given matrices alone "
                                f"(a run and re-ranking need the cache's embeddings)")
    shape = (len(index.images), len(index.captions))
    sims = [load_matrix(p, shape) for p in cfg.sims]
    names = [Path(p).stem for p in cfg.sims]
    for longer in (lambda p: str(Path(p).with_suffix("")), str):  # same names: the paths, then with suffixes
        if len(set(names)) < len(names):
            names = [longer(p) for p in cfg.sims]
    if len(set(names)) < len(names):
        raise PipelineError(f"--sims names the same file twice: {', '.join(cfg.sims)}")
    scorer = Scorer(SplitEmbeddings(index, []), protocols_for(cfg, index))
    t2i, every = index.text_to_image, np.arange(len(index.images))
    for name, s in zip(names, sims):
        scorer.add(name, *retrieval_ranks(s, t2i), Scores.of_matrices(every, s, s))
    if len(sims) > 1:
        weights = [1 / len(sims)] * len(sims)

        def block(part: Part) -> tuple[torch.Tensor, torch.Tensor]:
            return late_fusion_similarities([part_of(s, part) for s in sims], weights)

        scorer.add_computed("late-fusion", Scores(every, block))
        scorer.notes["late_fusion_weights"] = "equal (no val matrices to tune on)"
    return scorer.result(cfg.dataset, cfg.split, "")
