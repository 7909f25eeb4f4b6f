"""Recall metrics: exact ranks against a brute-force sort, tiling, embeddings read block by block, NaN."""
import h5py
import numpy as np
import pytest
import torch

from evaluate.recall import (
    recall_at_k,
    recall_curve,
    retrieval_ranks,
    retrieval_ranks_from_embeddings,
    retrieval_recall,
    retrieval_recall_from_embeddings,
)

KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


def brute_ranks(sims, text_to_image):
    """Reference: stable-sort every query's candidates by descending score, find the positives' places."""
    sims = np.asarray(sims, dtype=np.float64)
    n_img, n_txt = sims.shape
    i2t = []
    for i in range(n_img):
        order = list(np.argsort(-sims[i], kind="stable"))  # equal scores keep ascending index order
        places = [order.index(j) for j in range(n_txt) if text_to_image[j] == i]
        i2t.append(min(places) if places else -1)
    t2i = [list(np.argsort(-sims[:, j], kind="stable")).index(text_to_image[j]) for j in range(n_txt)]
    return np.array(i2t), np.array(t2i)


def brute_recall(sims, text_to_image, ks=(1, 5, 10)):
    i2t, t2i = brute_ranks(sims, text_to_image)
    i2t = i2t[i2t >= 0]
    out = {f"i2t_r{k}": 100.0 * sum(r < k for r in i2t) / len(i2t) for k in ks}
    out.update({f"t2i_r{k}": 100.0 * sum(r < k for r in t2i) / len(t2i) for k in ks})
    out["rsum"] = sum(out.values())
    return out


def problem(rng, n_img, lo=1, hi=7, shuffle=True, decimals=1):
    t2i = np.repeat(np.arange(n_img), rng.integers(lo, hi + 1, n_img))
    if shuffle:
        rng.shuffle(t2i)
    sims = rng.standard_normal((n_img, t2i.size)).astype(np.float32)
    return (np.round(sims, decimals) if decimals is not None else sims), t2i


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    sims, t2i = problem(rng, int(rng.integers(2, 30)), shuffle=seed % 2 == 1)
    ref = brute_ranks(sims, t2i)
    for tile in [(256, 4096), (1, 3), (7, 2)]:
        i2t, t2i_ranks = retrieval_ranks(sims, t2i, tile)
        np.testing.assert_array_equal(i2t, ref[0])
        np.testing.assert_array_equal(t2i_ranks, ref[1])
    got = retrieval_recall(sims, t2i)
    assert list(got) == KEYS
    assert got == pytest.approx(brute_recall(sims, t2i))


def test_all_equal_scores_rank_by_index():
    t2i = np.array([0, 0, 1, 2, 2])
    i2t, t2i_ranks = retrieval_ranks(np.zeros((3, 5)), t2i)
    np.testing.assert_array_equal(i2t, [0, 2, 3])  # each image's lowest caption index
    np.testing.assert_array_equal(t2i_ranks, t2i)  # each caption's image index


def test_infinities_and_dtypes():
    rng = np.random.default_rng(1)
    sims, t2i = problem(rng, 12)
    sims[rng.random(sims.shape) < 0.1] = np.inf
    sims[rng.random(sims.shape) < 0.1] = -np.inf
    ref = brute_ranks(sims, t2i)
    for s in [sims, sims.astype(np.float64), torch.from_numpy(sims), torch.from_numpy(sims).half(),
              torch.from_numpy(sims).bfloat16()]:
        exact = s.double().numpy() if isinstance(s, torch.Tensor) else s
        want = brute_ranks(exact, t2i) if isinstance(s, torch.Tensor) and s.dtype != torch.float32 else ref
        got = retrieval_ranks(s, t2i, (4, 9))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_image_without_captions_is_excluded():
    sims = np.array([[0.9, 0.4, 0.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.8]], dtype=np.float32)
    t2i = np.array([0, 2, 2])  # image 1 has no caption
    i2t, t2i_ranks = retrieval_ranks(sims, t2i)
    assert i2t.tolist() == [0, -1, 0]
    assert t2i_ranks.tolist() == [0, 1, 0]
    got = retrieval_recall(sims, t2i, ks=(1,))
    assert got == {"i2t_r1": 100.0, "t2i_r1": pytest.approx(200 / 3), "rsum": pytest.approx(100 + 200 / 3)}


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(2)
    sims, t2i = problem(rng, 300, shuffle=False, decimals=2)
    whole = retrieval_ranks(sims, t2i, sims.shape)
    for tile in [(256, 4096), (64, 100), (17, 333)]:
        got = retrieval_ranks(sims, t2i, tile)
        np.testing.assert_array_equal(got[0], whole[0])
        np.testing.assert_array_equal(got[1], whole[1])


def test_curve_matches_recall_at_k():
    rng = np.random.default_rng(3)
    sims, t2i = problem(rng, 80)
    i2t, t2i_ranks = retrieval_ranks(sims, t2i)
    curve = recall_curve(t2i_ranks, 50)
    assert curve.shape == (50,)
    assert [curve[k - 1] for k in (1, 5, 50)] == pytest.approx([recall_at_k(t2i_ranks, k) for k in (1, 5, 50)])
    assert recall_curve(i2t, 50)[-1] == pytest.approx(recall_at_k(i2t, 50))


def test_nan_raises():
    sims = np.zeros((4, 6), dtype=np.float32)
    t2i = np.arange(6) % 4
    for where in [(0, 0), (3, 1)]:  # a positive score, then an ordinary one
        bad = sims.copy()
        bad[where] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            retrieval_recall(bad, t2i)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall_from_embeddings(np.full((4, 3), np.nan), np.ones((6, 3)), t2i)


def test_bad_text_to_image():
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 3)), [0, 1])


def embedding_problem(rng, n_img=24, dim=8):
    """Small-integer embeddings: every dot product is exact whatever the summation order, and ties abound."""
    img = rng.integers(-2, 3, (n_img, dim)).astype(np.float32)
    img[5] = img[3]  # duplicated rows: tied scores everywhere in those rows/columns
    t2i = np.repeat(np.arange(n_img), rng.integers(1, 8, n_img))
    rng.shuffle(t2i)
    txt = rng.integers(-2, 3, (t2i.size, dim)).astype(np.float32)
    txt[7] = txt[2]
    txt[t2i == 4] = txt[0]
    return img, txt, t2i


def as_dask(x):
    da = pytest.importorskip("dask.array")
    return da.from_array(x, chunks=(11, x.shape[1]))


@pytest.mark.parametrize("kind", ["numpy", "torch", "float16", "h5py", "dask"])
def test_from_embeddings_equals_full_matrix(kind, tmp_path):
    rng = np.random.default_rng(4)
    img, txt, t2i = embedding_problem(rng)
    full = retrieval_ranks(img @ txt.T, t2i)
    if kind == "torch":
        img_in, txt_in = torch.from_numpy(img), torch.from_numpy(txt)
    elif kind == "float16":
        img_in, txt_in = img.astype(np.float16), txt.astype(np.float16)  # small integers are exact in float16
    elif kind == "h5py":
        f = h5py.File(tmp_path / "emb.h5", "w")
        img_in, txt_in = f.create_dataset("img", data=img), f.create_dataset("txt", data=txt.astype(np.float16))
    elif kind == "dask":
        img_in, txt_in = as_dask(img), as_dask(txt)
    else:
        img_in, txt_in = img, txt
    for blocks, tile in [((7, 13), (4, 8)), ((4096, 8192), (256, 4096))]:
        got = retrieval_ranks_from_embeddings(img_in, txt_in, t2i, *blocks, tile=tile)
        np.testing.assert_array_equal(got[0], full[0])
        np.testing.assert_array_equal(got[1], full[1])
    assert retrieval_recall_from_embeddings(img_in, txt_in, t2i, block_images=9, block_texts=31) == \
        retrieval_recall(img @ txt.T, t2i)


def test_from_embeddings_continuous():
    rng = np.random.default_rng(5)
    img = rng.standard_normal((120, 32)).astype(np.float32)
    t2i = np.repeat(np.arange(120), 5)
    txt = (img[t2i] + rng.standard_normal((600, 32))).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    want = brute_recall(img.astype(np.float64) @ txt.T.astype(np.float64), t2i)
    got = retrieval_recall_from_embeddings(img, txt, t2i, block_images=50, block_texts=128)
    assert got == pytest.approx(want)
    assert 0 < got["t2i_r1"] < 100
