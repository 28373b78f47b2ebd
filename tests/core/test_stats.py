import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
import torch

from dimfix.stats import DimStats

RTOL = 1e-9


def _mixed_matrix(n: int = 3000, seed: int = 0) -> np.ndarray:
    """Columns spanning 1e-2..1e4: a dim-4-like massive column with sink spikes, a tiny-σ column, ..."""
    g = np.random.default_rng(seed)
    x = np.empty((n, 6))
    x[:, 0] = 925.0 + 2753.0 * g.standard_normal(n)
    x[::50, 0] = 13504.0  # sink-like spikes
    x[:, 1] = 3.0 + 0.01 * g.standard_normal(n)
    x[:, 2] = g.exponential(2.0, n)  # skewed
    x[:, 3] = g.standard_t(4, n) * 5.0  # heavy tails
    x[:, 4] = -7.9 + 9.6 * g.standard_normal(n)
    x[:, 5] = 1e4 + 0.01 * g.standard_normal(n)  # tiny spread on a huge offset
    return x


def _exact_shape_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact rational (var ddof=0, skewness, kurtosis) per column, rounded once to float64."""
    var, skew, kurt = [], [], []
    for col in x.T:
        vals = [Fraction(float(v)) for v in col]
        n = len(vals)
        mean = sum(vals) / n
        d2 = [(v - mean) ** 2 for v in vals]
        m2 = sum(d2) / n
        m3 = sum(t * (v - mean) for t, v in zip(d2, vals)) / n
        m4 = sum(t * t for t in d2) / n
        var.append(float(m2))
        skew.append(float(m3) / float(m2) ** 1.5 if m2 else math.nan)
        kurt.append(float(m4 / (m2 * m2)) - 3.0 if m2 else math.nan)
    return np.array(var), np.array(skew), np.array(kurt)


def _close_shape(actual: np.ndarray, desired: np.ndarray, rtol: float) -> None:
    """Skewness/kurtosis are dimensionless O(1) numbers: relative error, or absolute near 0."""
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol)


def _assert_moments(st: DimStats, x: np.ndarray, rtol: float = RTOL) -> None:
    """Moments vs numpy/scipy; columns whose |mean|/σ exceeds 1e4 are ill-conditioned for scipy's
    uncompensated two-pass formulas, so their shape moments are checked against exact rationals."""
    n = x.shape[0]
    assert st.count == n
    np.testing.assert_allclose(st.mean.numpy(), x.mean(0), rtol=rtol, atol=0)
    for ddof in (0, 1):
        np.testing.assert_allclose(st.var(ddof).numpy(), x.var(0, ddof=ddof), rtol=rtol, atol=0)
        np.testing.assert_allclose(st.std(ddof).numpy(), x.std(0, ddof=ddof), rtol=rtol, atol=0)
    ok = np.abs(x.mean(0)) < 1e4 * x.std(0)
    for bias in (True, False):
        if bias or n >= 3:
            _close_shape(st.skewness(bias).numpy()[ok], scipy.stats.skew(x[:, ok], bias=bias), rtol)
        else:  # documented: NaN where the correction is undefined (scipy returns the biased value)
            assert torch.isnan(st.skewness(bias)).all()
        for fisher in (True, False):
            if bias or n >= 4:
                _close_shape(st.kurtosis(bias, fisher).numpy()[ok],
                             scipy.stats.kurtosis(x[:, ok], fisher=fisher, bias=bias), rtol)
            else:
                assert torch.isnan(st.kurtosis(bias, fisher)).all()
    if not ok.all():
        var, skew, kurt = _exact_shape_moments(x[:, ~ok])
        np.testing.assert_allclose(st.var(0).numpy()[~ok], var, rtol=rtol, atol=0)
        _close_shape(st.skewness().numpy()[~ok], skew, rtol)
        _close_shape(st.kurtosis().numpy()[~ok], kurt, rtol)
    np.testing.assert_array_equal(st.minimum().numpy(), x.min(0))
    np.testing.assert_array_equal(st.maximum().numpy(), x.max(0))


def test_exact_reference_beats_scipy_on_huge_offset_tiny_spread():
    # documents why _assert_moments uses exact rationals there: 1e4 ± 0.01
    x = _mixed_matrix()[:, 5:6]
    st = DimStats(1)
    st.update(torch.from_numpy(x))
    _, skew, kurt = _exact_shape_moments(x)
    assert abs(st.skewness().item() / skew[0] - 1) < 1e-12
    assert abs(st.kurtosis().item() / kurt[0] - 1) < 1e-12


def test_single_pass_moments_match_scipy_on_mixed_magnitudes():
    x = _mixed_matrix()
    st = DimStats(6)
    st.update(torch.from_numpy(x))
    _assert_moments(st, x)
    assert st.mean.dtype == torch.float64 and st.skewness().dtype == torch.float64


def test_many_update_calls_match_single_pass():
    x = _mixed_matrix(2000, seed=1)
    st = DimStats(6)
    for part in np.array_split(x, 37):
        st.update(torch.from_numpy(part))
    _assert_moments(st, x)


def test_merging_1000_random_chunks_with_empty_and_single_rows():
    x = _mixed_matrix(4000, seed=2)
    g = np.random.default_rng(3)
    cuts = np.sort(g.integers(0, x.shape[0], size=999))
    cuts[:5] = 0  # guarantees several empty chunks at the start
    parts = np.split(x, cuts)
    assert len(parts) == 1000
    assert any(len(p) == 0 for p in parts) and any(len(p) == 1 for p in parts)
    chunks = []
    for p in parts:
        s = DimStats(6)
        s.update(torch.from_numpy(p))
        chunks.append(s)
    seq = DimStats(6)
    for c in chunks:
        seq = seq.merge(c)
    _assert_moments(seq, x)
    # pairwise tree merge, too
    while len(chunks) > 1:
        chunks = [chunks[i].merge(chunks[i + 1]) if i + 1 < len(chunks) else chunks[i]
                  for i in range(0, len(chunks), 2)]
    _assert_moments(chunks[0], x)


def _state(st: DimStats) -> dict:
    """Every accumulator field of ``st`` (copies), for before/after comparisons."""
    return {"count": torch.tensor(st.count), "rows": st.rows.clone(),
            **{k: getattr(st, k).clone() for k in ("mean", "m2", "m3", "m4", "min", "max")}}


def test_merge_returns_new_object_and_leaves_inputs_unchanged():
    g = np.random.default_rng(4)
    a_np, b_np = g.normal(size=(30, 3)), g.normal(5, 2, size=(20, 3))
    a, b = DimStats(3), DimStats(3)
    a.update(torch.from_numpy(a_np))
    b.update(torch.from_numpy(b_np))
    before = (_state(a), _state(b))
    m = a.merge(b)
    assert m is not a and m is not b
    for snap, obj in zip(before, (a, b)):
        for k, v in _state(obj).items():
            assert torch.equal(v, snap[k]), k
    _assert_moments(m, np.concatenate([a_np, b_np]))


def test_batch_update_moments_are_not_skipped():
    # the batch path must carry M3/M4 (a skewed batch merged into a symmetric state)
    g = np.random.default_rng(5)
    x1 = g.normal(size=(500, 2))
    x2 = g.exponential(size=(700, 2)) * 10
    st = DimStats(2)
    st.update(torch.from_numpy(x1))
    st.update(torch.from_numpy(x2))
    _assert_moments(st, np.concatenate([x1, x2]))


def test_mask_selects_tokens_3d_input():
    g = np.random.default_rng(6)
    x = g.normal(size=(3, 40, 4)) * [1, 10, 100, 1000]
    mask = g.random((3, 40)) < 0.4
    st = DimStats(4)
    st.update(torch.from_numpy(x), torch.from_numpy(mask))
    _assert_moments(st, x[mask])
    none = DimStats(4)
    none.update(torch.from_numpy(x), torch.zeros(3, 40, dtype=torch.bool))
    assert none.count == 0


def test_mask_shape_and_dtype_errors():
    st = DimStats(4)
    x = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="mask must have shape"):
        st.update(x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        st.update(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        st.update(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        st.update(torch.zeros(3, 4, dtype=torch.int64))
    assert st.count == 0


def test_non_finite_input_rejected_atomically():
    st = DimStats(2)
    st.update(torch.ones(3, 2) * torch.tensor([1.0, 2.0]))
    snap = _state(st)
    bad = torch.randn(10000, 2)
    bad[9000, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        st.update(bad)
    for k, v in _state(st).items():
        assert torch.equal(v, snap[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_input_equals_its_float64_upcast(dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(257, 5, generator=g) * torch.tensor([0.01, 1.0, 30.0, 900.0, 2000.0])).to(dtype)
    x_before = x.clone()
    a, b = DimStats(5), DimStats(5)
    a.update(x)
    b.update(x.to(torch.float64))
    assert torch.equal(x, x_before) and x.dtype == dtype
    for name in ("mean", "m2", "m3", "m4", "min", "max"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for q, v in a.percentiles().items():
        assert torch.equal(v, b.percentiles()[q])


def test_float64_input_is_not_modified_or_aliased():
    x = torch.randn(50, 3, dtype=torch.float64)
    x_before = x.clone()
    st = DimStats(3)
    st.update(x)
    assert torch.equal(x, x_before)
    x.mul_(1000)  # later changes to the caller's tensor must not leak into the kept rows
    np.testing.assert_allclose(st.percentiles([50])[50].numpy(), np.percentile(x_before.numpy(), 50, axis=0))


def test_degenerate_counts_and_zero_variance():
    empty = DimStats(3)
    for t in (empty.var(), empty.var(0), empty.skewness(), empty.kurtosis(),
              empty.minimum(), empty.maximum(), empty.float32()[0], empty.percentiles([50])[50]):
        assert torch.isnan(t).all()
    one = DimStats(3)
    one.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.isnan(one.var(1)).all() and torch.equal(one.var(0), torch.zeros(3, dtype=torch.float64))
    assert torch.isnan(one.skewness()).all()  # zero variance
    two = DimStats(1)
    two.update(torch.tensor([[1.0], [3.0]]))
    assert two.skewness(bias=True).item() == 0.0 and torch.isnan(two.skewness(bias=False)).all()
    three = DimStats(1)
    three.update(torch.tensor([[1.0], [3.0], [7.0]]))
    assert math.isclose(three.skewness(False).item(), scipy.stats.skew([1, 3, 7], bias=False), rel_tol=1e-12)
    assert torch.isnan(three.kurtosis(bias=False)).all()
    assert math.isclose(three.kurtosis(True).item(), scipy.stats.kurtosis([1, 3, 7]), rel_tol=1e-12)
    # constant columns (also at large offsets) → NaN shape moments, like scipy
    const = DimStats(3)
    x = np.stack([np.full(100, 925.1), np.zeros(100), np.random.default_rng(0).normal(size=100)], 1)
    const.update(torch.from_numpy(x))
    sk, ku = const.skewness().numpy(), const.kurtosis().numpy()
    assert np.isnan(sk[:2]).all() and np.isnan(ku[:2]).all()
    # (scipy's own (ε·mean)² test misses the 925.1 column: its rounding noise gives skew = -1 there)
    np.testing.assert_allclose(sk[2], scipy.stats.skew(x[:, 2]), rtol=1e-9)
    assert const.std()[1].item() == 0.0


def test_percentiles_exact_below_limit():
    x = _mixed_matrix(1500, seed=8)
    st = DimStats(6, sample_rows=2000)
    for part in np.array_split(x, 7):
        st.update(torch.from_numpy(part))
    assert st.exact_percentiles
    qs = (0.0, 0.1, 1.0, 25.0, 50.0, 99.0, 99.9, 100.0)
    got = st.percentiles(qs)
    for q in qs:
        np.testing.assert_allclose(got[q].numpy(), np.percentile(x, q, axis=0), rtol=1e-12, atol=0)
    # a merge that stays under the limit stays exact
    a, b = DimStats(6, 2000), DimStats(6, 2000)
    a.update(torch.from_numpy(x[:700]))
    b.update(torch.from_numpy(x[700:]))
    m = a.merge(b)
    assert m.exact_percentiles
    np.testing.assert_allclose(m.percentiles([1.0])[1.0].numpy(), np.percentile(x, 1.0, axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="percent"):
        st.percentiles([101])


def _rank_error(x: np.ndarray, est: np.ndarray, q: float) -> np.ndarray:
    """Fraction of tokens below each per-dim estimate minus q/100."""
    return (x < est[None, :]).mean(0) - q / 100.0


def test_percentiles_approximate_above_limit_bounded_and_sane():
    g = np.random.default_rng(9)
    n, k = 60000, 1000
    x = np.column_stack([g.normal(size=n), g.exponential(size=n), 925 + 2753 * g.standard_t(3, n)])
    st = DimStats(3, sample_rows=k, seed=1)
    for part in np.array_split(x, 23):
        st.update(torch.from_numpy(part))
    assert not st.exact_percentiles and st.rows.shape == (k, 3)
    # every kept row is a real input row
    assert np.isin(st.rows[:, 0].numpy(), x[:, 0]).all()
    est = st.percentiles((0.0, 1.0, 50.0, 99.0, 100.0))
    for q in (1.0, 50.0, 99.0):
        sd = math.sqrt(q / 100 * (1 - q / 100) / k)
        assert np.abs(_rank_error(x, est[q].numpy(), q)).max() < 5 * sd + 1e-3
    np.testing.assert_array_equal(est[0.0].numpy(), x.min(0))
    np.testing.assert_array_equal(est[100.0].numpy(), x.max(0))
    _assert_moments(st, x)  # moments stay exact


def test_reservoir_merge_weights_parts_by_count():
    # part A (10000 tokens, all 0) merged with part B (1000 tokens, all 1): ≈ 1/11 of the sample is B
    k = 2000
    a, b = DimStats(1, k, seed=3), DimStats(1, k, seed=4)
    a.update(torch.zeros(10000, 1))
    b.update(torch.ones(1000, 1))
    frac = float(a.merge(b).rows.mean())
    sd = math.sqrt((1 / 11) * (10 / 11) / k)
    assert abs(frac - 1 / 11) < 5 * sd
    many = b.merge(a).merge(a).merge(a)  # 31000 tokens, 1000 of them ones
    assert abs(float(many.rows.mean()) - 1 / 31) < 5 * math.sqrt((1 / 31) * (30 / 31) / k)


def test_memory_bounded_for_100k_tokens():
    st = DimStats(256, sample_rows=512)
    batch = torch.randn(4000, 256, generator=torch.Generator().manual_seed(0))
    for i in range(25):  # 100k tokens in 4k-token batches of float16
        st.update((batch + i).to(torch.float16))
    assert st.count == 100000
    assert st.rows.shape == (512, 256)
    assert st._rows.numel() <= 512 * 256
    assert sum(t.numel() for t in _state(st).values()) <= 512 * 256 + 6 * 256 + 1
    # the sample is spread over all 25 batches (row mean ≈ 12 = mean of the offsets 0..24)
    assert abs(float(st.rows.mean()) - 12.0) < 1.0


def test_float32_convenience():
    x = torch.randn(100, 4, dtype=torch.float64) * 3 + 1
    st = DimStats(4)
    st.update(x)
    mean, std = st.float32()
    assert mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(0).float())
    torch.testing.assert_close(std, x.std(0).float())


def test_realistic_magnitudes_from_reference_stats(reference_stats_npz):
    ref = np.load(reference_stats_npz)
    mu, sd = ref["per_dim_mean"].astype(np.float64), ref["per_dim_std"].astype(np.float64)
    g = np.random.default_rng(12)
    x = mu + sd * g.standard_normal((400, mu.size))
    st = DimStats(mu.size, sample_rows=0)
    for part in np.array_split(x, 9):
        st.update(torch.from_numpy(part).to(torch.float32))
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(st.std().numpy(), x32.std(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(st.kurtosis().numpy(), scipy.stats.kurtosis(x32), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="sample_rows=0"):
        st.percentiles()
