"""QB-Norm and DBNorm: the bank pass against brute force, and hand-checked cases of both normalisations."""
import math

import numpy as np
import pytest
import torch
from test_evaluate_rerank import hub_problem

from evaluate.bank_norm import (
    ACTIVE_ALL,
    bank_block_rows,
    bank_stats,
    dbnorm_i2t,
    dbnorm_t2i,
    first_best,
    qbnorm_i2t,
    qbnorm_t2i,
    tune_dbnorm,
    tune_qbnorm,
)
from evaluate.recall import retrieval_recall


def test_bank_pass_equals_brute_force():
    rng = np.random.default_rng(0)
    gallery, bank = rng.standard_normal((11, 5)).astype(np.float32), rng.standard_normal((23, 5)).astype(np.float32)
    parts = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7, 8, 9, 10])]
    stats = bank_stats(gallery, torch.from_numpy(bank), betas=(1.0, 20.0), partitions={"all": [None], "halves": parts},
                       bank_block=4)  # 6 blocks: the running log-sum-exp is exercised
    s = bank @ gallery.T  # bank x gallery
    for beta in (1.0, 20.0):
        want = torch.logsumexp(beta * torch.from_numpy(s).double(), dim=0).float()
        torch.testing.assert_close(stats.lse[beta], want, rtol=1e-5, atol=1e-5)
    assert stats.active["all"].tolist() == [g in set(s.argmax(1)) for g in range(11)]
    within = {int(p[s[:, p].argmax(1)][b]) for p in parts for b in range(23)}
    assert stats.active["halves"].tolist() == [g in within for g in range(11)]
    assert stats.active["halves"].sum() >= stats.active["all"].sum()  # every part has its own top-1s
    assert bank_block_rows(12 * 1000 * 7, 1000) == 7 and bank_block_rows(1, 10 ** 6) == 1
    assert bank_stats(gallery, bank, (1.0,)).active == {}  # DBNorm's passes need no activation set
    top2 = bank_stats(gallery, bank, (1.0,), {"all": [None]}, top=2).active["all"]
    assert top2.tolist() == [g in set(np.argsort(-s, axis=1)[:, :2].ravel()) for g in range(11)]


def test_qbnorm_hand_checked():
    """Two images; every train caption retrieves image 0 first, so only image 0 is in the activation set."""
    lse_images = torch.tensor([math.log(math.exp(9) + math.exp(8) + math.exp(7)),  # bank sims .9 .8 .7, beta 10
                               math.log(math.exp(1) + math.exp(2) + math.exp(3))])  # bank sims .1 .2 .3
    active_images = torch.tensor([True, False])
    # Caption 0 scores image 0 first (0.5 vs 0.45): normalised. Caption 1 prefers image 1: left as it is.
    sims = torch.tensor([[0.5, 0.2], [0.45, 0.6]])
    out = qbnorm_t2i(sims, 10.0, lse_images, active_images)
    torch.testing.assert_close(out[:, 0], torch.tensor([5 - 9.40760596, 4.5 - 3.40760596]))
    torch.testing.assert_close(out[:, 1], sims[:, 1])
    assert out[:, 0].argmax() == 1  # the hub lost caption 0 to image 1
    # The ratio the paper writes, exp(beta s) / sum_b exp(beta s_b), ranks the same way.
    ratio = torch.exp(10 * sims[:, 0]) / torch.exp(lse_images)
    assert ratio.argmax() == out[:, 0].argmax()
    # Image queries: the same rule with the captions' statistics.
    out = qbnorm_i2t(sims, 10.0, lse_images, active_images)  # 2 captions here, their stats reused
    torch.testing.assert_close(out[0], 10 * sims[0] - lse_images)
    torch.testing.assert_close(out[1], sims[1])


def test_dbnorm_hand_checked():
    """DualIS: the product of the query-bank and gallery-bank inverted softmaxes, here in log space."""
    sims = torch.tensor([[0.5, 0.1], [0.4, 0.3]])  # images x captions
    q_lse = torch.tensor([2.0, 0.5])  # per image: LSE over the train captions at beta1
    g_lse = torch.tensor([1.0, -0.5])  # per image: LSE over the train images at beta2
    b1, b2 = 10.0, 3.0
    out = dbnorm_t2i(sims, (b1, b2), q_lse, g_lse)
    query_is = torch.exp(b1 * sims) / torch.exp(q_lse)[:, None]  # exp(beta1 s) / sum over the query bank
    gallery_is = torch.exp(b2 * sims) / torch.exp(g_lse)[:, None]
    want = torch.log(query_is * gallery_is)
    torch.testing.assert_close(out, want)
    # Caption 0: 13 * 0.5 - 3 = 3.5 for image 0 against 13 * 0.4 - 0 = 5.2 for image 1: image 1 now wins.
    torch.testing.assert_close(out[:, 0], torch.tensor([3.5, 5.2]))
    out = dbnorm_i2t(sims, (b1, b2), q_lse, g_lse)
    torch.testing.assert_close(out, 13 * sims - (q_lse + g_lse)[None, :])


def test_both_demote_a_hub_and_tune_on_val():
    img, txt, t2i, bank_img, bank_txt = hub_problem(np.random.default_rng(1))
    sims = torch.from_numpy(img @ txt.T)
    betas = (1.0, 10.0, 30.0)
    images_q = bank_stats(img, bank_txt, betas, ACTIVE_ALL)  # images vs the train-caption bank
    captions_q = bank_stats(txt, bank_img, betas, ACTIVE_ALL)
    images_g, captions_g = bank_stats(img, bank_img, betas), bank_stats(txt, bank_txt, betas)
    assert images_q.lse[10.0].argmax() == 0  # the hub attracts the caption bank most
    before = retrieval_recall(sims, t2i)
    b_i2t, b_t2i = tune_qbnorm(sims, t2i, captions_q, images_q, betas)
    after = retrieval_recall(qbnorm_t2i(sims, b_t2i, images_q.lse[b_t2i], images_q.active["all"]), t2i)
    assert after["t2i_r1"] > before["t2i_r1"]
    d_i2t, d_t2i = tune_dbnorm(sims, t2i, captions_q, captions_g, images_q, images_g, betas)
    assert d_i2t in {(a, b) for a in betas for b in betas}
    after = retrieval_recall(dbnorm_t2i(sims, d_t2i, images_q.lse[d_t2i[0]], images_g.lse[d_t2i[1]]), t2i)
    assert after["t2i_r1"] > before["t2i_r1"]


def test_first_best_breaks_ties_by_index():
    sims = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0], [3.0, 0.0, 2.0]])
    assert first_best(sims, 0).tolist() == [1, 0, 0] and first_best(sims, 1).tolist() == [1, 1, 0]
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 3, (40, 30)).astype(np.float32))
    assert torch.equal(first_best(x, 0), x.argmax(dim=0)) and torch.equal(first_best(x, 1), x.argmax(dim=1))


def test_empty_bank_is_refused():
    with pytest.raises(ValueError, match="empty"):
        bank_stats(np.ones((2, 3), np.float32), np.ones((0, 3), np.float32), (1.0,))
