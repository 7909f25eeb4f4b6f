"""`pipeline score --eccv --coco-1k` on a synthetic COCO 5K test split carrying eccv_caption's real ids.

The split's 5,000 images and 25,000 captions are the package's test ids (image files and caption texts are made
here); the embeddings are small integers over 8, so every score is exact in float32 whatever the summation order
and the independent computations below see exactly the scores the pipeline ranked, ties included.
"""
import json

import numpy as np
import pytest

from conftest import run_cli
from data.datasets import load_splits, resolve
from data.index import store_index
from data.store import FeatureStore, ShardData, write_shard
from evaluate.eccv import KS, TARGETS, load_metrics

DIM = 16


def package_test_split():
    """[(COCO image id, [its 5 caption annotation ids])] in the package's order."""
    metrics = load_metrics()
    order = list(dict.fromkeys(metrics.coco_gts["t2i"][int(c)][0] for c in metrics.coco_ids))
    return [(i, metrics.coco_gts["i2t"][i]) for i in order]


def caption_text(ann_id: int) -> str:
    return f"A photo number {ann_id} of something"


def write_store(cache, split, name, index, images, texts):
    root = FeatureStore.at(cache, "coco", split, name).root
    root.mkdir(parents=True)
    for kind, embeds in (("images", images), ("texts", texts)):
        n = len(embeds)
        write_shard(root / f"{kind}-00000.h5", ShardData(np.arange(n), embeds, np.ones(n, np.float32),
                                                         np.zeros(n + 1, np.int64)), {"kind": kind})
    manifest = {"schema": 1, "fingerprint": {"index_version": index.version, "checkpoint": "synthetic"},
                "complete": True, "shards": {"images": ["images-00000.h5"], "texts": ["texts-00000.h5"]}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def exact_embeddings(rng, t2i, n_images, noise):
    """Images: integers in [-7, 7] / 8; captions: their image's vector plus integer noise / 8 (exact products)."""
    img = rng.integers(-7, 8, (n_images, DIM))
    txt = img[t2i] + rng.integers(-noise, noise + 1, (len(t2i), DIM))
    return (img / 8).astype(np.float32), (txt / 8).astype(np.float32)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A cache with coco/test (the package's 5K ids), small train and val splits, backbones a and b."""
    tmp = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    entries, annotations, images = [], [], []
    for image_id, caption_ids in package_test_split():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        entries.append({"filepath": "val2014", "filename": name, "split": "test", "cocoid": image_id,
                        "sentences": [{"raw": caption_text(c)} for c in caption_ids]})
        images.append({"id": image_id, "file_name": name})
        # The file's texts differ in case and spacing, and list an image's captions in another order.
        annotations += [{"id": c, "image_id": image_id, "caption": "  " + caption_text(c).upper() + " \n"}
                        for c in reversed(caption_ids)]
    for split, n in (("train", 300), ("val", 120)):
        for k in range(n):
            entries.append({"filepath": "train2014", "filename": f"{split}_{k}.jpg", "split": split,
                            "sentences": [{"raw": f"{split} caption {k} {j}"} for j in range(5)]})
    root = tmp / "datasets" / "coco"
    root.mkdir(parents=True)
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    captions_file = tmp / "captions_val2014.json"
    captions_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    cache = tmp / "cache"
    embeds = {}
    for split, index in load_splits(resolve("coco", tmp / "datasets")).items():
        store_index(index, cache)
        for name, noise in (("a", 5), ("b", 6)):
            embeds[split, name] = exact_embeddings(rng, index.text_to_image, len(index.images), noise)
            write_store(cache, split, name, index, *embeds[split, name])
    return cache, captions_file, embeds, tmp


def top_lists(sims, k):
    """Independent top-k: numpy's stable argsort of the negated scores (ties: lower index first)."""
    i2t = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    t2i = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]
    return i2t, t2i


def brute_fold_recalls(sims, t2i):
    """R@1/5/10 both ways of one fold from first principles: rank = higher scores + equal ones at lower indices."""
    n_img, n_txt = sims.shape
    cols = np.arange(n_txt)
    pos = sims[t2i, cols]
    t2i_rank = (sims > pos).sum(0) + np.array([(sims[:t2i[j], j] == pos[j]).sum() for j in range(n_txt)])
    per_caption = np.array([(sims[t2i[j]] > pos[j]).sum() + (sims[t2i[j], :j] == pos[j]).sum() for j in cols])
    i2t_rank = np.full(n_img, np.iinfo(np.int64).max)
    np.minimum.at(i2t_rank, t2i, per_caption)
    out = {f"i2t_r{k}": 100 * np.mean(i2t_rank < k) for k in KS}
    out.update({f"t2i_r{k}": 100 * np.mean(t2i_rank < k) for k in KS})
    return out


@pytest.mark.slow
def test_eccv_and_coco_1k_equal_the_package_and_a_fold_by_fold_computation(coco):
    cache, captions_file, embeds, tmp = coco
    out = run_cli("score", "--dataset", "coco", "--cache", cache, "--runs", tmp / "runs", "--eccv", "--coco-captions",
                  captions_file, "--coco-1k", "--rerank", "--qbnorm", "--dbnorm", "--json", tmp / "s.json",
                  "--plot", tmp / "s.png").output
    doc = json.loads((tmp / "s.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert list(rows) == ["a", "b", "late-fusion", "a+rerank", "b+rerank", "a+qbnorm", "a+dbnorm", "b+qbnorm",
                          "b+dbnorm"]
    assert [r["method"] for r in doc["coco_1k"]] == list(rows) and all("eccv" in r for r in rows.values())
    assert set(doc["notes"]["qbnorm_betas"]) == {"a", "b"} and set(doc["notes"]["dbnorm_betas"]["a"]) == {"i2t", "t2i"}
    assert "Corrected positives" in out and "COCO 1K" in out and "ECCV mAP@R" in (tmp / "s.md").read_text()
    assert (tmp / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    img, txt = embeds["test", "a"]
    sims = img @ txt.T  # exact: equal to the pipeline's scores bit for bit
    metrics = load_metrics()
    i2t_top, t2i_top = top_lists(sims, 50)
    split = package_test_split()
    image_ids = np.array([i for i, _ in split])
    caption_ids = np.array([c for _, caps in split for c in caps])
    want = metrics.compute_all_metrics({int(i): caption_ids[r].tolist() for i, r in zip(image_ids, i2t_top)},
                                       {int(c): image_ids[r].tolist() for c, r in zip(caption_ids, t2i_top)},
                                       target_metrics=TARGETS, Ks=KS)
    assert rows["a"]["eccv"] == json.loads(json.dumps(want))
    assert 0.05 < want["eccv_map_at_r"]["t2i"] < 0.95  # a ranking with signal, not a degenerate one

    # The package's COCO 5K recall is our own table's, for every row (this also proves the id mapping).
    for row in rows.values():
        for d in ("i2t", "t2i"):
            for k in KS:
                assert 100 * row["eccv"][f"coco_5k_r{k}"][d] == pytest.approx(row[f"{d}_r{k}"], abs=1e-9)

    # COCO 1K: consecutive folds of 1,000 images in split order, each ranked alone, averaged.
    t2i = np.repeat(np.arange(5000), 5)
    folds = [brute_fold_recalls(sims[f * 1000:(f + 1) * 1000][:, t2i // 1000 == f], t2i[t2i // 1000 == f] - f * 1000)
             for f in range(5)]
    one_k = {r["method"]: r for r in doc["coco_1k"]}["a"]
    for key in folds[0]:
        assert one_k[key] == pytest.approx(np.mean([f[key] for f in folds]), abs=1e-9)
    assert one_k["rsum"] == pytest.approx(sum(one_k[k] for k in folds[0]))
    assert one_k["t2i_r1"] > rows["a"]["t2i_r1"]  # 1,000 candidates are easier than 5,000


def test_refusals(coco):
    """Unmatched captions, a split that is not COCO 5K, and options that need each other: one clear line each."""
    cache, captions_file, _, tmp = coco
    doc = json.loads(captions_file.read_text())
    doc["annotations"][1]["caption"] = "a caption nobody wrote"
    bad = tmp / "bad_captions.json"
    bad.write_text(json.dumps(doc))
    base = ("score", "--dataset", "coco", "--cache", cache, "--runs", tmp / "runs")
    out = run_cli(*base, "--eccv", "--coco-captions", bad, expect=2).output
    image = doc["annotations"][1]["image_id"]
    assert out.count("\n") == 1 and f"matches no unused caption of COCO image {image}" in out
    assert caption_text(doc["annotations"][1]["id"]) in out
    out = run_cli(*base, "--split", "val", "--eccv", "--coco-captions", captions_file, expect=2).output
    assert "image 'train2014/val_0.jpg' of coco/val is not in" in out
    out = run_cli(*base, "--split", "val", "--coco-1k", expect=2).output
    assert "--coco-1k needs a split of 5,000 images (COCO 5K test), but coco/val has 120" in out
    assert "--eccv needs --coco-captions" in run_cli(*base, "--eccv", expect=2).output
    assert "--pmrp goes with --eccv" in run_cli(*base, "--pmrp", tmp, expect=2).output
