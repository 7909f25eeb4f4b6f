"""`pipeline search`: a text or image query against a run's cached fused embeddings of a split."""
from __future__ import annotations

import logging
from pathlib import Path

from data.device import pick_device
from data.errors import PipelineError
from data.store import FeatureStore
from fuse import checkpoint
from fuse.data import memory_budget_gb, open_stores
from fuse.run import check_run_stores, encode_run
from search import exact, faiss_index
from search.config import SearchConfig
from search.query import embed_query

log = logging.getLogger("pipeline.search")
FAISS_ABOVE = 1_000_000  # --index auto: candidates above which exact search is too slow for one query (BENCHMARKS)


def check_query(cfg: SearchConfig, text: str | None) -> None:
    if (text is None) == (cfg.image is None):
        raise PipelineError("give one query: TEXT, or --image PATH" if text is None else
                            "give one query: TEXT or --image PATH, not both")
    if text is not None and not text.strip():
        raise PipelineError("the query TEXT is empty")
    if cfg.image is not None and not Path(cfg.image).is_file():
        raise PipelineError(f"--image {cfg.image}: no such file")


def run_dataset(cfg: SearchConfig, saved: dict) -> str:
    """The dataset searched: the run's (its fused embeddings are made from that dataset's cache)."""
    dataset = saved["config"]["dataset"]
    if cfg.dataset and cfg.dataset != dataset:
        raise PipelineError(f"--dataset {cfg.dataset}: run {cfg.run!r} was trained on {dataset!r}, and its fused "
                            f"embeddings are encoded from that dataset's cache; leave out --dataset or pass "
                            f"--dataset {dataset}")
    return dataset


def method_for(cfg: SearchConfig, candidates: int) -> str:
    """exact or faiss: as asked, or (auto) FAISS above FAISS_ABOVE candidates when it is installed."""
    if cfg.index != "auto":
        return cfg.index
    if candidates <= FAISS_ABOVE:
        return "exact"
    try:
        faiss_index.faiss_module()
    except PipelineError:
        log.warning("%d candidates: exact search (install faiss-cpu for a faster index)", candidates)
        return "exact"
    return "faiss"


def run_search(cfg: SearchConfig, text: str | None) -> tuple[dict, dict]:
    """(the results document, what else to report: dataset, target, method, candidates, the FAISS index's
    record). Results: {"query", "run", "split", "results": [{"rank", "score", "row", "image" or "caption"}]}."""
    check_query(cfg, text)
    run_dir = Path(cfg.runs) / cfg.run
    saved = checkpoint.read_config(run_dir)
    dataset = run_dataset(cfg, saved)
    target = cfg.target or ("captions" if cfg.image else "images")
    kind = "images" if target == "images" else "texts"
    index, stores = open_stores(cfg.cache, dataset, cfg.split, saved["backbones"])
    check_run_stores(saved, cfg.run, cfg.split, stores)  # before any weights are loaded
    query = embed_query(run_dir, stores, text, cfg.image, pick_device(cfg.device))
    memory_gb = memory_budget_gb(cfg.memory_gb)
    fused = FeatureStore(encode_run(run_dir, cfg.split, cfg.cache, cfg.device, memory_gb))
    candidates = faiss_index.count_rows(fused, kind)
    method = method_for(cfg, candidates)
    info = None
    if method == "faiss":
        other = "texts" if kind == "images" else "images"
        ann, info = faiss_index.cached_index(fused, kind, other, run_dir / "index" / cfg.split, memory_gb)
        scores, rows = faiss_index.search(ann, query[None], cfg.top)
    else:
        block = exact.rows_per_block(len(query), 1, memory_gb)
        scores, rows = exact.top_k(fused.embed_blocks(kind, block), query[None], cfg.top,
                                   candidates if candidates > block else 0)  # progress only when in blocks
    names = index.images if kind == "images" else index.captions
    key = "image" if kind == "images" else "caption"
    results = [{"rank": r + 1, "score": float(s), "row": int(row), key: names[row]}
               for r, (s, row) in enumerate(zip(scores[0], rows[0]))]
    doc = {"query": text if text is not None else cfg.image, "run": cfg.run, "split": cfg.split, "results": results}
    return doc, {"dataset": dataset, "target": target, "method": method, "candidates": candidates, "faiss": info}


def faiss_line(info: dict) -> str:
    """What the FAISS index is and its recall against exact search (measured when it was built)."""
    when = "built now" if info["built"] else "cached"
    return (f"FAISS IVF{info['nlist']},Flat index of {info['rows']:,} {info['kind']} ({when}, {info['path']}): "
            f"recall@{info['recall_k']} {info['recall']:.3f} against exact search on {info['recall_queries']} "
            f"sample queries (the split's {info['queries_from']}), nprobe {info['nprobe']}")


def format_results(doc: dict, meta: dict) -> str:
    """The results as a table: rank, score, image path (relative to the dataset's image folder) or caption."""
    key = "image" if meta["target"] == "images" else "caption"
    how = "exact search" if meta["method"] == "exact" else "FAISS index"
    lines = [f"{meta['dataset']}/{doc['split']}, run {doc['run']}: top {len(doc['results'])} of "
             f"{meta['candidates']:,} {meta['target']} for {doc['query']!r} ({how})"]
    if meta["faiss"]:
        lines.insert(0, faiss_line(meta["faiss"]))
    lines.append(f"{'rank':>4}  {'score':>7}  {key}")
    lines += [f"{r['rank']:>4}  {r['score']:7.4f}  {r[key]}" for r in doc["results"]]
    return "\n".join(lines)
