import math

import numpy as np
import pytest
import scipy.stats
import torch

from dimfix import compare as cmp
from dimfix import rules
from dimfix.config import VERDICT_CRITERIA, Thresholds
from dimfix.stats import DimStats


def _stats_from(x: np.ndarray) -> DimStats:
    st = DimStats(x.shape[1], sample_rows=0)
    st.update(torch.from_numpy(x))
    return st


def _two_point(means: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Two tokens per dim with exactly the given mean and ddof=1 std (x = μ ± σ/√2)."""
    h = np.asarray(sigmas, dtype=np.float64) / math.sqrt(2.0)
    return np.stack([means - h, means + h])


D = 20
BASE_SIGMA = np.full(D, 2.0)


def _hand_built():
    """Reference σ = 2 everywhere except a few dims; target differs in known ways."""
    ref_s = BASE_SIGMA.copy()
    tgt_s = BASE_SIGMA.copy()
    tgt_s[3] = 2.0 * 3.5  # outlier high (ratio 3.5 > 3)
    tgt_s[5] = 2.0 / 4.0  # outlier low (ratio 0.25 < 1/3)
    tgt_s[6] = 2.0 * 2.9  # just below τ: not an outlier
    tgt_s[7] = 0.005  # dead in target only (< dead_abs) and outlier low
    ref_s[8] = tgt_s[8] = 0.004  # dead in both
    ref_s[9] = 0.0  # dead in reference only (zero std) → finite ratio
    tgt_s[11] = 2.0 * 5.5  # hyperactive in target only (> 5 × median 2) and outlier high
    ref_s[12] = tgt_s[12] = 30.0  # hyperactive in both
    mu_ref = np.linspace(-3, 3, D)
    mu_tgt = mu_ref * 1.1 + 0.2
    return (_stats_from(_two_point(mu_ref, ref_s)), _stats_from(_two_point(mu_tgt, tgt_s)), ref_s, tgt_s,
            mu_ref, mu_tgt)


def test_compare_classifies_hand_built_dims():
    ref, tgt, ref_s, tgt_s, mu_ref, mu_tgt = _hand_built()
    c = cmp.compare(ref, tgt)
    assert c.outlier_high == [3, 9, 11]  # dim 9: tgt 2 vs ref 0 → huge but finite ratio
    assert c.outlier_low == [5, 7]
    assert c.outliers == [3, 5, 7, 9, 11]
    assert c.dead_ref == [8, 9] and c.dead_tgt == [7, 8]
    assert c.dead_target_only == [7] and c.dead_reference_only == [9] and c.dead_shared == [8]
    assert c.hyper_ref == [12] and c.hyper_tgt == [11, 12]
    assert c.hyper_target_only == [11] and c.hyper_reference_only == [] and c.hyper_shared == [12]
    assert torch.isfinite(c.ratio).all() and torch.isfinite(c.log_ratio).all()
    assert c.ratio.dtype == torch.float32 and c.log_ratio.dtype == torch.float32
    np.testing.assert_allclose(c.ratio[[0, 3, 5, 6]].numpy(), [1.0, 3.5, 0.25, 2.9], rtol=1e-5)
    assert c.median_std_ref == pytest.approx(2.0) and c.median_std_tgt == pytest.approx(2.0)
    np.testing.assert_allclose(c.sigma_ref.numpy(), ref_s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(c.mean_tgt.numpy(), mu_tgt, rtol=1e-6, atol=1e-6)
    assert c.mean_pearson == pytest.approx(1.0) and c.mean_spearman == pytest.approx(1.0)
    assert c.mean_cosine == pytest.approx(float(mu_ref @ mu_tgt / np.linalg.norm(mu_ref) / np.linalg.norm(mu_tgt)))
    s_ref, s_tgt = ref.std().numpy(), tgt.std().numpy()  # ranks see the float64 σ actually measured
    assert c.std_pearson == pytest.approx(scipy.stats.pearsonr(s_ref, s_tgt)[0], abs=1e-12)
    assert c.std_spearman == pytest.approx(scipy.stats.spearmanr(s_ref, s_tgt)[0], abs=1e-12)


def test_thresholds_change_classification():
    ref, tgt, *_ = _hand_built()
    strict = cmp.compare(ref, tgt, Thresholds(outlier_ratio=2.5, hyper_mult=20.0, dead_abs=0.0))
    assert 6 in strict.outlier_high  # ratio 2.9 > 2.5
    assert strict.hyper_tgt == [] and strict.dead_tgt == []
    rel = cmp.compare(ref, tgt, Thresholds(dead_abs=0.0, dead_rel=0.01))  # < 0.01 × median 2 = 0.02
    assert rel.dead_tgt == [7, 8] and rel.dead_ref == [8, 9]


def test_top_sorted_by_abs_log_ratio():
    ref, tgt, ref_s, tgt_s, mu_ref, mu_tgt = _hand_built()
    c = cmp.compare(ref, tgt)
    top = c.top(4)
    assert [r["dim"] for r in top] == [9, 7, 11, 5]  # |ln r|: huge, ln(400), ln 5.5, ln 4
    assert set(top[0]) == {"dim", "ratio", "sigma_ref", "sigma_tgt", "mean_ref", "mean_tgt"}
    assert top[2]["sigma_tgt"] == pytest.approx(11.0) and top[2]["mean_ref"] == pytest.approx(mu_ref[11], abs=1e-6)
    assert [r["dim"] for r in c.top(2, by="high")] == [9, 11]
    assert [r["dim"] for r in c.top(2, by="low")] == [7, 5]
    with pytest.raises(ValueError, match="by must be"):
        c.top(3, by="kurtosis")
    assert c.outlier_high == [3, 9, 11] and c.dead_target_only == [7]


def test_std_ratio_relative_eps_and_symmetric_log():
    ref = torch.tensor([0.0, 1.0, 2.0, 4.0, 1000.0], dtype=torch.float64)
    tgt = torch.tensor([1.0, 1.0, 4.0, 1.0, 1000.0], dtype=torch.float64)
    eps_rel = 1e-3
    eps = eps_rel * 1.5  # pooled σ sorted: 0 1 1 1 1 | 2 4 4 1000 1000 -> median (1 + 2) / 2
    assert float(rules.ratio_eps(ref, tgt, eps_rel)) == pytest.approx(eps) == float(rules.ratio_eps(tgt, ref, eps_rel))
    r = rules.std_ratio(tgt, ref, eps_rel)
    np.testing.assert_allclose(r.numpy(), (tgt.numpy() + eps) / (ref.numpy() + eps), rtol=1e-15)
    assert math.isfinite(float(r[0])) and float(r[0]) == pytest.approx((1.0 + eps) / eps)
    # symmetric with the same eps_rel: swapping the models flips the sign, exactly
    assert torch.equal(rules.log_ratio(tgt, ref, eps_rel), -rules.log_ratio(ref, tgt, eps_rel))
    a = _stats_from(_two_point(np.zeros(5), ref.numpy()))
    b = _stats_from(_two_point(np.zeros(5), tgt.numpy()))
    assert torch.equal(cmp.compare(a, b).log_ratio, -cmp.compare(b, a).log_ratio)
    torch.testing.assert_close(rules.log_ratio(tgt, ref, eps_rel), torch.log(r), rtol=1e-14, atol=1e-14)
    # all-zero reference: still finite
    z = rules.std_ratio(torch.ones(3), torch.zeros(3), 1e-6)
    assert torch.isfinite(z).all()
    with pytest.raises(ValueError, match="dims"):
        rules.std_ratio(torch.ones(3), torch.ones(4))


def test_pearson_spearman_match_scipy_with_ties():
    g = np.random.default_rng(0)
    a = g.integers(0, 6, size=200).astype(float)  # many ties
    b = a * 0.5 + g.integers(0, 4, size=200)
    assert cmp.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-12)
    assert cmp.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
    np.testing.assert_allclose(cmp.rankdata(a).numpy(), scipy.stats.rankdata(a))
    # massive-activation-like scales
    x = np.abs(g.normal(size=2560)) * 5.6
    x[[4, 396, 0, 100]] = [2752.6, 948.7, 193.4, 77.2]
    y = x * g.uniform(0.8, 1.2, size=2560)
    assert cmp.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert cmp.spearman(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
        scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    assert cmp.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_correlations_nan_for_constant_or_nan_input():
    assert math.isnan(cmp.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(cmp.spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(cmp.pearson([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]))
    assert math.isnan(cmp.pearson([1.0], [2.0]))
    with pytest.raises(ValueError, match="lengths differ"):
        cmp.pearson([1, 2], [1, 2, 3])


def test_outlier_flags_and_consistency():
    ref, tgt, *_ = _hand_built()
    assert cmp.compare(ref, tgt, Thresholds()).outliers == [3, 5, 7, 9, 11]
    f = torch.zeros(4, 6, dtype=torch.bool)
    f[:, 0] = True  # 4/4
    f[:2, 1] = True  # 2/4 = exactly 50 % → consistent
    f[3, 2] = True  # 1/4 → prompt specific
    f[[0, 2, 3], 4] = True  # 3/4
    consistent, specific, freq = cmp.consistency(f)
    assert consistent == [0, 1, 4] and specific == [2]
    np.testing.assert_allclose(freq.numpy(), [1.0, 0.5, 0.25, 0.0, 0.75, 0.0])
    assert freq.dtype == torch.float32
    c3, s3, _ = cmp.consistency(f[:3])  # P = 3: dim 1 has 2/3 ≥ 0.5, dim 4 has 2/3
    assert c3 == [0, 1, 4] and s3 == []
    c_strict, s_strict, _ = cmp.consistency(f, min_fraction=0.75)
    assert c_strict == [0, 4] and s_strict == [1, 2]
    with pytest.raises(ValueError, match=r"\[P, D\]"):
        cmp.consistency(torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_fraction"):
        cmp.consistency(f, min_fraction=0.0)


@pytest.mark.parametrize("values, passed", [
    ((0.96, 0.96, 0.91, 9), True),
    ((0.95, 0.96, 0.91, 9), False),  # strict: cosine must exceed 0.95
    ((0.96, 0.95, 0.91, 9), False),
    ((0.96, 0.96, 0.90, 9), False),
    ((0.96, 0.96, 0.91, 10), False),  # outlier dims must be < 10
    ((0.96, float("nan"), 0.91, 0), False),
    ((0.9500001, 0.9500001, 0.9000001, list(range(9))), True),
])
def test_verdict_boundaries(values, passed):
    v = cmp.verdict(*values)
    assert v.passed is passed
    assert [r.name for r in v.rows] == ["cosine", "std correlation", "mean correlation", "outlier dims"]
    assert [r.threshold for r in v.rows] == [VERDICT_CRITERIA["cosine_min"], VERDICT_CRITERIA["std_correlation_min"],
                                              VERDICT_CRITERIA["mean_correlation_min"],
                                              VERDICT_CRITERIA["outlier_dims_max"]]
    md = v.to_markdown()
    assert md.count("\n|") == 5 and ("PASS" in md) is passed and ("FAIL" in md) is (not passed)


def test_verdict_rows_report_failing_criterion():
    v = cmp.verdict(0.99, 0.5, 0.99, [1, 2, 3])
    assert [r.passed for r in v.rows] == [True, False, True, True]
    assert v.rows[3].value == 3 and v.rows[1].op == ">" and v.rows[3].op == "<"
    custom = cmp.verdict(0.99, 0.5, 0.99, 3, criteria={**VERDICT_CRITERIA, "std_correlation_min": 0.4})
    assert custom.passed


def test_compare_rejects_bad_inputs():
    a = _stats_from(np.ones((1, 3)))
    b = _stats_from(np.random.default_rng(0).normal(size=(5, 3)))
    with pytest.raises(ValueError, match="need at least 2"):
        cmp.compare(a, b)
    with pytest.raises(ValueError, match="dims"):
        cmp.compare(b, _stats_from(np.random.default_rng(0).normal(size=(5, 4))))
    with pytest.raises(TypeError, match="DimStats"):
        cmp.compare(b, np.ones(3))


def test_compare_on_real_reference_magnitudes(reference_stats_npz):
    ref_npz = np.load(reference_stats_npz)
    mu, sd = ref_npz["per_dim_mean"].astype(np.float64), ref_npz["per_dim_std"].astype(np.float64)
    tgt_sd = sd.copy()
    tgt_sd[396] = sd[396] / 600.0  # the VL image-token collapse of dim 396
    tgt_sd[1710] = sd[1710] * 3.42
    ref, tgt = _stats_from(_two_point(mu, sd)), _stats_from(_two_point(mu, tgt_sd))
    c = cmp.compare(ref, tgt)
    assert c.outlier_low == [396] and c.outlier_high == [1710]
    assert c.std_pearson == pytest.approx(scipy.stats.pearsonr(sd, tgt_sd)[0], abs=1e-6)
    assert 4 in c.hyper_ref and c.median_std_ref == pytest.approx(float(np.median(sd)), rel=1e-6)
    assert c.top(1)[0]["dim"] == 396
