"""Late fusion: standardisation, the weight grid, and weights tuned where the right answer is known."""
import numpy as np
import pytest
import torch

from evaluate.late_fusion import late_fusion_recall, standardise, tune_weights, weight_grid
from evaluate.recall import retrieval_recall


def signal(n_img=100, per=5):
    t2i = np.repeat(np.arange(n_img), per)
    return (np.arange(n_img)[:, None] == t2i[None, :]).astype(np.float32), t2i


def noisy(rng, clean, strength, scale=1.0, shift=0.0):
    return (scale * (strength * clean + rng.standard_normal(clean.shape)) + shift).astype(np.float32)


def test_standardise_per_query():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((6, 9)) * 3 + 1
    s[2] = 4.0  # a constant row
    rows, cols = standardise(s, 1), standardise(s.astype(np.float32), 0)
    assert rows.dtype == torch.float64 and cols.dtype == torch.float32
    np.testing.assert_allclose(rows.mean(1), 0, atol=1e-9)
    np.testing.assert_allclose(rows.std(1, correction=0)[[0, 1, 3, 4, 5]], 1, atol=1e-9)
    assert torch.all(rows[2] == 0)
    np.testing.assert_allclose(cols.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(cols.std(0, correction=0), 1, atol=1e-5)


def test_weight_grid():
    grid = weight_grid(2, 0.1)
    assert len(grid) == 11 and grid[0] == (1.0, 0.0) and grid[-1] == (0.0, 1.0)
    grid3 = weight_grid(3, 0.1)
    assert len(grid3) == 66 and grid3[:2] == [(1.0, 0.0, 0.0), (0.9, 0.1, 0.0)]
    assert all(min(w) >= 0 and sum(w) == pytest.approx(1) for w in grid3)
    with pytest.raises(ValueError):
        weight_grid(2, 0.3)


def test_single_matrix_weight_equals_plain_recall():
    rng = np.random.default_rng(1)
    clean, t2i = signal()
    a, b = noisy(rng, clean, 2.0), noisy(rng, clean, 1.0)
    assert late_fusion_recall([a, b], (1.0, 0.0), t2i) == retrieval_recall(a, t2i)


def test_informative_beats_noise():
    rng = np.random.default_rng(2)
    clean, t2i = signal()
    informative, noise = noisy(rng, clean, 2.5, scale=0.1), noisy(rng, clean, 0.0, scale=5.0, shift=3.0)
    w = tune_weights([noise, informative], t2i)
    assert len(w) == 2 and w[1] >= 0.8
    w3 = tune_weights([informative, noise, noisy(rng, clean, 0.0)], t2i, step=0.25)
    assert w3[0] >= 0.75 and sum(w3) == pytest.approx(1)


def test_fusing_helps():
    rng = np.random.default_rng(3)
    clean, t2i = signal()
    a, b = noisy(rng, clean, 2.0), noisy(rng, clean, 2.0, scale=30.0, shift=-7.0)  # same quality, other scale
    w = tune_weights([a, b], t2i)
    assert 0.2 <= w[0] <= 0.8
    fused = late_fusion_recall([a, b], w, t2i)["rsum"]
    assert fused > retrieval_recall(a, t2i)["rsum"] and fused > retrieval_recall(b, t2i)["rsum"]


def test_weights_must_match():
    with pytest.raises(ValueError):
        late_fusion_recall([np.zeros((2, 2))], (0.5, 0.5), [0, 1])
