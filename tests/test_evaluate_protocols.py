"""Top-K lists, COCO 1K folds, the ECCV Caption adapter against the package, and COCO ids read from a captions file."""
import json

import numpy as np
import pytest
import torch

from data.coco_ids import read_coco_ids
from data.errors import PipelineError
from data.index import SplitIndex
from evaluate.eccv import KS, TARGETS, EccvMetrics, load_metrics
from evaluate.protocols import Protocols, Scores, coco_1k_folds, mean_recalls
from evaluate.recall import retrieval_recall
from evaluate.topk import top_k, top_k_from_embeddings


@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_is_the_stable_order_with_ties(seed):
    rng = np.random.default_rng(seed)
    sims = rng.integers(0, 4, (37, 53)).astype(np.float32)  # many ties, across the K-th place too
    sims[3] = 1.0  # a row of equal scores
    for k in (1, 5, 53, 60):
        i2t, t2i = top_k(sims, k, block=8)
        assert i2t.tolist() == np.argsort(-sims, axis=1, kind="stable")[:, :k].tolist()
        assert t2i.tolist() == np.argsort(-sims.T, axis=1, kind="stable")[:, :k].tolist()
    assert top_k(sims, 2, which="t2i")[0] is None
    sims[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        top_k(sims, 3)


def test_top_k_from_embeddings_equals_the_matrix():
    rng = np.random.default_rng(2)
    img, txt = rng.integers(-2, 3, (30, 4)).astype(np.float32), rng.integers(-2, 3, (70, 4)).astype(np.float32)
    got = top_k_from_embeddings(img, torch.from_numpy(txt), 7, block=9)
    want = top_k(img @ txt.T, 7)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_coco_1k_folds_and_their_mean():
    t2i = np.repeat(np.arange(5000), 5)
    t2i = np.insert(t2i, 5, 0)  # image 0 has 6 captions
    folds = coco_1k_folds(5000, t2i)
    assert [len(i) for i, _ in folds] == [1000] * 5 and folds[1][0][0] == 1000
    assert len(folds[0][1]) == 5001 and np.array_equal(folds[4][1], np.flatnonzero(t2i >= 4000))
    with pytest.raises(ValueError, match="5,000-image"):
        coco_1k_folds(4000, t2i[t2i < 4000])
    assert mean_recalls([{"a": 1.0, "rsum": 3.0}, {"a": 2.0, "rsum": 5.0}]) == {"a": 1.5, "rsum": 4.0}


def test_coco_1k_scores_each_fold_alone():
    """With matrices (e.g. --sims), each fold's scores are the slice; recall as the fold's own split."""
    rng = np.random.default_rng(3)
    t2i = np.repeat(np.arange(5000), 2)
    sims = torch.from_numpy(rng.standard_normal((5000, 10000)).astype(np.float32))
    sims[torch.from_numpy(t2i), torch.arange(10000)] += 2.0
    protocols = Protocols(t2i, 5000, coco_1k=True)
    row = {"method": "m"}
    protocols.add(row, Scores.of_matrices(np.arange(5000), sims, sims))
    folds = [retrieval_recall(sims[f * 1000:(f + 1) * 1000, f * 2000:(f + 1) * 2000], np.repeat(np.arange(1000), 2))
             for f in range(5)]
    got = protocols.rows_1k[0]
    assert got["method"] == "m" and got == pytest.approx({"method": "m", **mean_recalls(folds)})
    assert "eccv" not in row and set(protocols.curves_1k["m"]) == {"i2t", "t2i"}


@pytest.fixture(scope="module")
def package_ids():
    metrics = load_metrics()
    images = np.array(sorted(metrics.coco_gts["i2t"]))
    captions = np.array([c for i in images for c in metrics.coco_gts["i2t"][i]])
    return images, captions


def test_eccv_adapter_hands_the_package_its_lists(package_ids):
    """Random lists over the split's rows, with 3 extra captions the package does not know: they are left out
    of the image->text lists and are not queries; everything else reaches the package unchanged."""
    images, captions = package_ids
    extra = np.array([10 ** 9, 10 ** 9 + 1, 10 ** 9 + 2])
    caption_ids = np.concatenate([captions[:7], extra, captions[7:]])  # extras at rows 7-9
    eccv = EccvMetrics(images, caption_ids, "coco/test")
    assert (eccv.k, eccv.left_out, eccv.i2t_length) == (50, 3, 53)
    rng = np.random.default_rng(0)
    i2t_top = torch.from_numpy(np.stack([rng.permutation(len(caption_ids))[:53] for _ in images]))
    i2t_top[0, :3] = torch.tensor([7, 8, 9])  # image 0's first three are the extras
    t2i_top = torch.from_numpy(np.stack([rng.permutation(len(images))[:50] for _ in caption_ids]))
    got = eccv(i2t_top, t2i_top)
    kept = ~np.isin(caption_ids, extra)
    i2t = {int(i): [int(caption_ids[r]) for r in row if kept[r]][:50] for i, row in zip(images, i2t_top.numpy())}
    assert i2t[int(images[0])] == caption_ids[i2t_top[0, 3:53].numpy()].tolist()
    t2i = {int(c): images[row].tolist() for c, row, k in zip(caption_ids, t2i_top.numpy(), kept) if k}
    want = load_metrics().compute_all_metrics(i2t, t2i, target_metrics=TARGETS, Ks=KS)
    assert got == want and set(got) == {"eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_r1", "cxc_r5",
                                        "cxc_r10", "coco_5k_r1", "coco_5k_r5", "coco_5k_r10"}


def test_eccv_refuses_another_split(package_ids):
    images, captions = package_ids
    with pytest.raises(PipelineError, match=r"1 of the package's 5,000 are missing .* 1 are not among them"):
        EccvMetrics(np.concatenate([images[:-1], [1]]), captions, "coco/test")
    with pytest.raises(PipelineError, match="1 of the package's 25,000 test captions are not among"):
        EccvMetrics(images, captions[1:], "coco/test")
    with pytest.raises(PipelineError, match="--pmrp nowhere: no pm_image_to_caption.json"):
        EccvMetrics(images, captions, "coco/test", pmrp="nowhere")


def write_captions(path, annotations, images=(("val2014/COCO_val2014_000000000042.jpg", 42),
                                              ("COCO_val2014_000000000073.jpg", 73))):
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f.split("/")[-1]} for f, i in images],
                                "annotations": annotations}))


def test_coco_ids_matched_by_file_name_and_text(tmp_path):
    index = SplitIndex.from_samples("coco", "test", [("val2014/COCO_val2014_000000000042.jpg", ["A dog.", "a dog."]),
                                                     ("val2014/COCO_val2014_000000000073.jpg", ["Two cats  sleep"])])
    path = tmp_path / "captions.json"
    write_captions(path, [{"id": 5, "image_id": 73, "caption": "two cats sleep\n"},
                          {"id": 7, "image_id": 42, "caption": "A dog. "},
                          {"id": 3, "image_id": 42, "caption": "A dog."}])
    ids = read_coco_ids(path, index)
    assert ids.images.tolist() == [42, 73] and ids.captions.tolist() == [7, 3, 5]  # equal texts pair up in order

    write_captions(path, [{"id": 5, "image_id": 73, "caption": "two cats sleep"},
                          {"id": 7, "image_id": 42, "caption": "A dog."}])
    with pytest.raises(PipelineError, match=r"caption 1 of coco/test \('a dog.', image 'val2014/COCO_val2014_0+42"
                                            r".jpg'\) matches no unused caption of COCO image 42"):
        read_coco_ids(path, index)
    dogs = [{"id": 7, "image_id": 42, "caption": "A dog."}, {"id": 8, "image_id": 42, "caption": "a dog."}]
    write_captions(path, dogs, images=[("COCO_val2014_000000000042.jpg", 42)])
    with pytest.raises(PipelineError, match="image 'val2014/COCO_val2014_000000000073.jpg' of coco/test is not in"):
        read_coco_ids(path, index)
    path.write_text(json.dumps([{"image": "x.jpg", "caption": ["a"]}]))
    with pytest.raises(PipelineError, match="not a COCO captions file"):
        read_coco_ids(path, index)
    with pytest.raises(PipelineError, match="no such file"):
        read_coco_ids(tmp_path / "nothing.json", index)


def test_pmrp_files_add_pmrp_and_lengthen_the_lists(package_ids, tmp_path):
    """Stand-in PM files (the real ones are a separate 140 MB download): COCO's own pairs, one query with 60."""
    images, captions = package_ids
    metrics = load_metrics()
    i2t = {str(i): v for i, v in metrics.coco_gts["i2t"].items()}
    t2i = {str(c): v for c, v in metrics.coco_gts["t2i"].items()}
    t2i[str(captions[0])] = images[:60].tolist()
    (tmp_path / "pm_image_to_caption.json").write_text(json.dumps(i2t))
    (tmp_path / "pm_caption_to_image.json").write_text(json.dumps(t2i))
    eccv = EccvMetrics(images, captions, "coco/test", pmrp=str(tmp_path))
    assert eccv.k == 60 and eccv.targets[-1] == "pmrp"
    rng = np.random.default_rng(1)
    i2t_top = torch.from_numpy(np.stack([rng.permutation(len(captions))[:60] for _ in images]))
    t2i_top = torch.from_numpy(np.stack([rng.permutation(len(images))[:60] for _ in captions]))
    got = eccv(i2t_top, t2i_top)
    want = load_metrics(str(tmp_path)).pmrp({"i2t": {int(i): captions[r].tolist() for i, r in zip(images, i2t_top)},
                                              "t2i": {int(c): images[r].tolist() for c, r in zip(captions, t2i_top)}},
                                             "all")
    assert got["pmrp"] == want


def test_a_method_missing_images_gets_no_eccv_metrics(package_ids):
    images, captions = package_ids
    protocols = Protocols(np.repeat(np.arange(5000), 5), 5000, eccv=EccvMetrics(images, captions, "coco/test"))
    row = {"method": "m"}
    present = np.delete(np.arange(5000), [3, 7])
    protocols.add(row, Scores.of_matrices(present, torch.zeros(4998, 25000), torch.zeros(4998, 25000)))
    assert "eccv" not in row and "2 test images are missing" in protocols.notes["eccv_skipped"]["m"]
    assert "top 50" in protocols.notes["eccv"]
