"""NNN re-ranking: the hubness term, and a constructed hub that it demotes."""
import numpy as np
import pytest
import torch

from evaluate.recall import retrieval_recall
from evaluate.rerank import hubness, nnn_recall, nnn_similarities, tune_alpha


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_hubness_matches_sort():
    rng = np.random.default_rng(0)
    cand, bank = rng.standard_normal((13, 6)), rng.standard_normal((40, 6))
    want = np.sort(cand @ bank.T, axis=1)[:, -4:].mean(1)
    got = hubness(cand.astype(np.float32), torch.from_numpy(bank.astype(np.float32)), k=4, block=5, bank_block=7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(hubness(cand, bank[:3], k=16).numpy(), (cand @ bank[:3].T).mean(1), rtol=1e-5)


def hub_problem(rng, n_img=60, per=3, dim=32):
    """Captions share a common direction; image 0 points along it, so it is near every caption (a hub)."""
    common = rng.standard_normal(dim)
    img = rng.standard_normal((n_img, dim))
    img[0] = 3 * common
    t2i = np.repeat(np.arange(n_img), per)
    txt = img[t2i] + 2.2 * common + 1.5 * rng.standard_normal((t2i.size, dim))
    bank_img = rng.standard_normal((500, dim))
    bank_img[:20] = 3 * common + rng.standard_normal((20, dim))
    bank_txt = rng.standard_normal((2000, dim)) + 2.2 * common
    return unit(img), unit(txt), t2i, unit(bank_img), unit(bank_txt)


def test_hub_is_demoted():
    img, txt, t2i, bank_img, bank_txt = hub_problem(np.random.default_rng(1))
    raw = img @ txt.T
    for_i2t, for_t2i = nnn_similarities(img, txt, bank_img, bank_txt)
    drop = raw - for_t2i.numpy()  # per image, constant across captions
    assert drop[0, 0] == pytest.approx(drop[0].max()) and drop[0, 0] > np.delete(drop[:, 0], 0).max()
    hub_wins = lambda s: int((np.asarray(s).argmax(0) == 0).sum())  # noqa: E731 captions retrieving the hub first
    assert hub_wins(for_t2i) < hub_wins(raw)
    before, after = retrieval_recall(raw, t2i), nnn_recall(img, txt, t2i, bank_img, bank_txt)
    assert after["t2i_r1"] > before["t2i_r1"]
    assert nnn_recall(img, txt, t2i, bank_img, bank_txt, alpha=0.0) == before
    assert tune_alpha(img, txt, t2i, bank_img, bank_txt, alphas=(0.0, 0.5, 1.0)) > 0
    np.testing.assert_allclose(raw - for_i2t.numpy(), np.broadcast_to((raw - for_i2t.numpy())[:1], raw.shape),
                               atol=1e-6)  # the i2t correction is per caption
