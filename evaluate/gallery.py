"""A retrieval gallery: one self-contained HTML page of sampled queries, each method's top 5 side by side.

Thumbnails are embedded in the page (JPEG, base64): the page can be moved, mailed or opened on a machine without
the dataset, and still shows every image (links relative to the page would break when it moves, and cannot point
into collections whose images live inside tar or parquet files). About 5 KB per photograph's thumbnail.

For text -> image, each sampled caption's top 5 images per method, the ground truth marked; for image -> text,
each sampled image's top 5 captions per method, its own captions marked. The counts say, over every query of the
split, how often hada's top-1 is right where a method's is wrong (fixes) and the reverse (breaks). Ground-truth
ranks and counts come from the ranks the score table was computed from; the lists are recomputed for the
sampled queries with the same scores and the same tie rule (equal scores: the lower index first).
"""
from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.atomic import write_text
from data.datasets import recorded_images
from data.errors import PipelineError
from data.store import FeatureStore
from evaluate.late_fusion import CANDIDATE_DIM, standardise

log = logging.getLogger("pipeline.score")
TOP = 5
THUMB = 112  # pixels, the longer side
CHECK = "\u2713"


@dataclass
class MethodLists:
    """One method's top-TOP candidates for the sampled queries: image ids per caption, caption rows per image."""

    name: str
    t2i: np.ndarray  # (captions sampled, TOP) image ids
    i2t: np.ndarray  # (images sampled, TOP) caption rows


def top_rows(scores: torch.Tensor, dim: int) -> np.ndarray:
    """Indices of the TOP best along ``dim`` per query, equal scores in index order (as the score ranks them)."""
    s = scores if dim == 1 else scores.T
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :TOP].numpy()


def method_lists(split, weights: dict | None, captions: np.ndarray, images: np.ndarray) -> list[MethodLists]:
    """Every method's lists: the backbones and hada from their own embeddings, late fusion from the backbones'
    standardised scores with the weights tuned on val."""
    out, slices = [], {}
    backbones = [e for e in split.methods if e.name != "hada"]
    common = split.common_ids(backbones)
    cols = torch.from_numpy(captions)
    for emb in split.methods:
        sims = emb.similarities()
        rows = torch.from_numpy(np.searchsorted(emb.image_ids, images))
        out.append(MethodLists(emb.name, emb.image_ids[top_rows(sims[:, cols], 0)], top_rows(sims[rows], 1)))
        if emb.name != "hada" and weights:
            keep = torch.from_numpy(np.searchsorted(emb.image_ids, common))
            slices[emb.name] = (sims[:, cols][keep], sims[rows])  # columns first: never a copy of the whole
        del sims
    if weights and len(slices) > 1:
        t2i = sum(w * standardise(slices[n][0], CANDIDATE_DIM["t2i"]) for n, w in weights.items() if w)
        i2t = sum(w * standardise(slices[n][1], CANDIDATE_DIM["i2t"]) for n, w in weights.items() if w)
        at = next((k for k, m in enumerate(out) if m.name == "hada"), len(out))
        out.insert(at, MethodLists("late-fusion", common[top_rows(t2i, 0)], top_rows(i2t, 1)))
    return out


def sample_queries(split, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(caption rows, image ids), ``n`` of each drawn at random among images every method holds, sorted."""
    rng = np.random.default_rng(seed)
    present = split.common_ids()
    t2i = split.index.text_to_image
    captions = np.flatnonzero(np.isin(t2i, present))
    images = present[np.isin(present, t2i)]
    pick = lambda xs: np.sort(rng.choice(xs, size=min(n, len(xs)), replace=False))  # noqa: E731
    return pick(captions), pick(images)


def thumbnail(images, index, row: int, cache: dict) -> str:
    """An <img> of image ``row`` as an embedded JPEG thumbnail, or a placeholder naming it when it cannot be read.

    ``images``: the split's image source (data/image_source.py; None: not found)."""
    rel = index.images[row]
    if rel not in cache:
        try:
            if images is None:
                raise FileNotFoundError(rel)
            ref = images.refs(index, [row])[0]
            with Image.open(ref if isinstance(ref, Path) else io.BytesIO(ref.read())) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB, THUMB))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=80)
            cache[rel] = (f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}" '
                          f'alt="{html.escape(rel)}" title="{html.escape(rel)}">')
        except (OSError, EOFError):
            cache[rel] = f'<span class="missing" title="{html.escape(rel)}">{html.escape(rel)}<br>(not found)</span>'
    return cache[rel]


def split_images(cache: str, dataset: str, split: str, store: str, data_root: str, index):
    """The split's image source: as the store's extraction read the images, else a Karpathy folder under
    --data-root; None when neither gives this split index."""
    saved = FeatureStore.at(cache, dataset, split, store).manifest().get("config") or {}
    for config in ([saved] if saved else []) + [{"data_root": data_root}]:
        images = recorded_images(config, index)
        if images is not None:
            return images
    return None


def rank_text(rank: int, what: str) -> str:
    """Where the score ranked the ground truth (``what``), 1-based; absent images never are."""
    return f"{what} at rank {rank + 1}" if 0 <= rank < 1 << 40 else f"{what}: absent (not extracted)"


def counts(ranks: dict, names: list[str]) -> list[dict]:
    """Per method and direction, over every query: hada right where it is wrong (fixes), the reverse (breaks)."""
    rows = []
    for name in names:
        row = {"method": name}
        for d, direction in enumerate(("i2t", "t2i")):
            mine, hada = ranks[name][d], ranks["hada"][d]
            valid = (mine >= 0) & (hada >= 0)
            a, h = (mine == 0) & valid, (hada == 0) & valid
            row[direction] = {"fixes": int((h & ~a).sum()), "breaks": int((a & ~h).sum()),
                              "both_right": int((a & h).sum()), "both_wrong": int((valid & ~a & ~h).sum()),
                              "queries": int(valid.sum())}
        rows.append(row)
    return rows


STYLE = """
body{font-family:sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;margin-bottom:24px}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}
th{background:#f2f2f2}
.hits{display:flex;flex-wrap:wrap;gap:3px}
figure{margin:0;border:2px solid transparent;position:relative;text-align:center;font-size:11px}
figure img{display:block;width:52px;height:52px;object-fit:cover}
figure.gt{border-color:#1a9c3a}
figure.gt::after{content:"\\2713";position:absolute;top:0;right:2px;color:#fff;background:#1a9c3a;
 font-weight:bold;padding:0 3px}
li.gt{color:#1a7c2f;font-weight:bold}
li.gt::before{content:"\\2713 "}
.missing{display:inline-block;width:52px;height:52px;background:#eee;font-size:9px;overflow:hidden}
.rank{font-size:11px;color:#555}
td.query{width:150px}
td.method{min-width:296px}
td.query img{width:80px;height:auto}
.tags{font-size:11px;color:#555}
.fix{color:#1a7c2f}.break{color:#b3261e}
"""


def counts_table(rows: list[dict]) -> str:
    head = ("<tr><th rowspan=2>hada against</th><th colspan=4>text \u2192 image (captions)</th>"
            "<th colspan=4>image \u2192 text (images)</th></tr><tr>"
            + "<th>fixes</th><th>breaks</th><th>both right</th><th>both wrong</th>" * 2 + "</tr>")
    body = "".join(
        f'<tr data-method="{html.escape(r["method"])}"><th>{html.escape(r["method"])}</th>' + "".join(
            f'<td class="{k}">{r[d][k]}</td>' for d in ("t2i", "i2t")
            for k in ("fixes", "breaks", "both_right", "both_wrong")) + "</tr>" for r in rows)
    return f'<table id="counts">{head}{body}</table>'


def tags(ranks: dict, names: list[str], d: int, q: int) -> str:
    """Which methods' top-1 hada fixes or breaks for query ``q`` (direction ``d``: 0 i2t, 1 t2i)."""
    if "hada" not in ranks:
        return ""
    h = ranks["hada"][d][q] == 0
    fixed = [n for n in names if h and ranks[n][d][q] != 0]
    broken = [n for n in names if not h and ranks[n][d][q] == 0]
    parts = ([f'<span class="fix">hada fixes {", ".join(map(html.escape, fixed))}</span>'] if fixed else []) + \
            ([f'<span class="break">hada breaks {", ".join(map(html.escape, broken))}</span>'] if broken else [])
    return f'<div class="tags">{"; ".join(parts)}</div>' if parts else ""


def write_gallery(path: str, result: dict, source, n: int, seed: int = 0) -> Path:
    """The page for a score result (``result`` as evaluate.score.run_score returns it), thumbnails read from the
    image source ``source`` (None: images named only); returns its path."""
    split, ranks = result.get("embeddings"), result.get("ranks", {})
    if split is None:
        raise PipelineError("--gallery needs the cache's embeddings: it cannot be combined with --sims")
    index = split.index
    weights = result["notes"].get("late_fusion_weights")
    captions, images = sample_queries(split, n, seed)
    lists = method_lists(split, weights, captions, images)
    others = [m.name for m in lists if m.name != "hada"]
    thumbs: dict[str, str] = {}
    head = "".join(f'<th>{html.escape(m.name)}</th>' for m in lists)

    t2i_rows = []
    for q, cap in enumerate(captions):
        truth = int(index.text_to_image[cap])
        cells = []
        for m in lists:
            figs = "".join(
                f'<figure class="hit{" gt" if int(i) == truth else ""}" data-row="{int(i)}">'
                f'{thumbnail(source, index, int(i), thumbs)}{r + 1}</figure>' for r, i in enumerate(m.t2i[q]))
            cells.append(f'<td class="method" data-method="{html.escape(m.name)}"><div class="hits">{figs}</div>'
                         f'<div class="rank">{rank_text(int(ranks[m.name][1][cap]), "ground truth")}</div></td>')
        t2i_rows.append(
            f'<tr class="query" data-row="{int(cap)}" data-truth="{truth}"><td class="query">'
            f'{html.escape(index.captions[cap])}<div class="rank">ground truth: {html.escape(index.images[truth])}'
            f'</div>{thumbnail(source, index, int(truth), thumbs)}{tags(ranks, others, 1, cap)}</td>'
            f'{"".join(cells)}</tr>')

    i2t_rows = []
    for q, img in enumerate(images):
        img = int(img)
        cells = []
        for m in lists:
            items = "".join(
                f'<li class="hit{" gt" if int(index.text_to_image[c]) == img else ""}" data-row="{int(c)}">'
                f'{html.escape(index.captions[int(c)])}</li>' for c in m.i2t[q])
            cells.append(f'<td class="method" data-method="{html.escape(m.name)}"><ol>{items}</ol>'
                         f'<div class="rank">{rank_text(int(ranks[m.name][0][img]), "first own caption")}</div></td>')
        i2t_rows.append(
            f'<tr class="query" data-row="{img}"><td class="query">{thumbnail(source, index, int(img), thumbs)}'
            f'<div class="rank">{html.escape(index.images[img])}</div>{tags(ranks, others, 0, img)}</td>'
            f'{"".join(cells)}</tr>')

    title = f"Retrieval gallery: {result['dataset']}/{result['split']}" + (f", run {result['run']}"
                                                                           if result["run"] else "")
    summary = (counts_table(counts(ranks, others)) if "hada" in ranks else
               '<p id="counts">No fused run was scored: no hada column and no fix/break counts.</p>')
    random_note = f'<p><b>{html.escape(result["notes"]["random_init"])}</b></p>' if "random_init" in result[
        "notes"] else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(captions)} captions and {len(images)} images drawn at random (seed {seed}) from the
{len(index.captions):,} captions and {len(index.images):,} images of the split; each method's top {TOP},
the ground truth marked {CHECK} in green. Counts over every query of the split: hada's top-1 right where the
method's is wrong (fixes), and the reverse (breaks).</p>{random_note}
<h2>hada against each method's top-1</h2>{summary}
<section id="t2i"><h2>Text \u2192 image</h2><table><tr><th>caption</th>{head}</tr>{"".join(t2i_rows)}</table></section>
<section id="i2t"><h2>Image \u2192 text</h2><table><tr><th>image</th>{head}</tr>{"".join(i2t_rows)}</table></section>
</body></html>
"""
    write_text(path, page)
    log.info("gallery of %d + %d queries (%d images embedded) written to %s", len(captions), len(images),
             sum(t.startswith("<img") for t in thumbs.values()), path)
    return Path(path)


def gallery(cfg, result: dict) -> Path:
    """`pipeline score --gallery`: the page for a score result, images read where the first store's extraction
    read them (``cfg``: the ScoreConfig)."""
    store = result["embeddings"].methods[0].name if result.get("embeddings") else None
    index = result["embeddings"].index if store else None
    images = split_images(cfg.cache, cfg.dataset, cfg.split, store, cfg.data_root, index) if store else None
    if images is None:
        log.warning("the images of %s/%s were not found: the gallery shows their names", cfg.dataset, cfg.split)
    return write_gallery(cfg.gallery, result, images, cfg.gallery_queries)
