import numpy as np
import pytest
import torch

from dimfix import rules
from dimfix.config import Thresholds


def test_median_true_and_lower_match_numpy():
    g = np.random.default_rng(0)
    for n in (1, 2, 7, 10):
        x = g.normal(size=(3, n))
        got = rules.median(torch.from_numpy(x))
        np.testing.assert_allclose(got.numpy(), np.median(x, axis=-1), rtol=0, atol=0)
        lower = rules.median(torch.from_numpy(x), lower=True)
        np.testing.assert_array_equal(lower.numpy(), np.sort(x, axis=-1)[:, (n - 1) // 2])
        assert torch.equal(lower, torch.from_numpy(x).median(-1).values)
    assert torch.isnan(rules.median(torch.zeros(0)))


def test_dead_hyper_outliers_on_hand_values():
    th = Thresholds(dead_abs=0.01, dead_rel=0.1, hyper_mult=5.0, outlier_ratio=3.0)
    s = torch.tensor([0.005, 0.05, 1.0, 1.0, 2.0, 20.0], dtype=torch.float64)  # true median 1.0, lower 1.0
    assert rules.dead(s, th).tolist() == [True, True, False, False, False, False]  # 0.05 < 0.1·1
    assert rules.dead(s, th, absolute_only=True).tolist() == [True] + [False] * 5
    assert rules.hyper(s, th).tolist() == [False] * 5 + [True]
    even = torch.tensor([1.0, 2.0, 4.0, 10.0], dtype=torch.float64)  # true median 3, lower median 2
    assert rules.hyper(even, Thresholds(hyper_mult=4.0)).tolist() == [False] * 4  # 10 < 12
    assert rules.hyper(even, Thresholds(hyper_mult=4.0), lower=True).tolist() == [False] * 3 + [True]  # 10 > 8
    high, low = rules.outliers(torch.tensor([3.01, 3.0, 1 / 3.0, 0.33, 1.0]), 3.0)
    assert high.tolist() == [True, False, False, False, False]
    assert low.tolist() == [False, False, False, True, False]


def test_origin_ratio_guards_tiny_reference():
    r = rules.std_ratio(torch.tensor([2.0, 3.0]), torch.tensor([4.0, 1e-7]), origin=True)
    assert r.tolist() == [0.5, 3.0]
    batched = rules.std_ratio(torch.rand(3, 5) + 0.1, torch.rand(1, 5) + 0.1)
    assert batched.shape == (3, 5)
    with pytest.raises(ValueError, match="dims"):
        rules.ratio_eps(torch.ones(3), torch.ones(4), 1e-6)
