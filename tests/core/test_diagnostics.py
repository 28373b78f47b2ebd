import math

import numpy as np
import pytest
import scipy.stats
import torch

from dimfix.compare import verdict
from dimfix.diagnostics import (TokenSimilarity, dit_verdict, kurtosis_se, mixed_dims, shape_flags, skew_se)
from dimfix.dit import CapEmbedder
from dimfix.pairs import PairSums
from dimfix.stats import DimStats
from zdf_testkit.profiles import load_profile, near_identity_mix, qwen_like_profile


def test_standard_errors_match_monte_carlo():
    g = np.random.default_rng(0)
    x = g.standard_normal((20000, 40))
    sk = scipy.stats.skew(x, axis=1, bias=False)
    ku = scipy.stats.kurtosis(x, axis=1, bias=False)
    assert sk.std() == pytest.approx(skew_se(40), rel=0.03)
    assert ku.std() == pytest.approx(kurtosis_se(40), rel=0.05)
    assert skew_se(4000) == pytest.approx(math.sqrt(6 / 4000), rel=2e-3)
    assert kurtosis_se(4000) == pytest.approx(math.sqrt(24 / 4000), rel=3e-3)
    assert math.isnan(skew_se(2)) and math.isnan(kurtosis_se(3))


def _shape_defect(g, kind, n):
    if kind == "laplace":
        z = g.laplace(size=n)
    elif kind == "exponential":
        z = g.exponential(size=n)
    elif kind == "student_t5":
        z = g.standard_t(5, size=n)
    else:  # bimodal: two narrow modes
        z = np.where(g.random(n) < 0.5, -1.0, 1.0) + 0.3 * g.standard_normal(n)
    return (z - z.mean()) / z.std()


def _recall_and_fp(mean, sigma, seed):
    n, dim = 4000, mean.size
    g = np.random.default_rng(seed)
    ref = mean + sigma * g.standard_normal((n, dim))
    z = g.standard_normal((n, dim))
    bad = g.choice(dim, size=200, replace=False)
    kinds = ("laplace", "exponential", "student_t5", "bimodal")
    for i, d in enumerate(bad):
        z[:, d] = _shape_defect(g, kinds[i % 4], n)
    tgt = mean + sigma * z
    rs, ts = DimStats(dim, sample_rows=0), DimStats(dim, sample_rows=0)
    rs.update(torch.from_numpy(ref))
    ts.update(torch.from_numpy(tgt))
    res = shape_flags(rs, ts)
    for d in bad[:3].tolist() + [1, 2]:
        assert float(res.kurt_tgt[d]) == pytest.approx(scipy.stats.kurtosis(tgt[:, d], bias=False), rel=1e-4, abs=1e-5)
        assert float(res.skew_tgt[d]) == pytest.approx(scipy.stats.skew(tgt[:, d], bias=False), rel=1e-4, abs=1e-5)
    flagged = set(res.flagged)
    recall = len(flagged & set(bad.tolist())) / bad.size
    fp = len(flagged - set(bad.tolist())) / (dim - bad.size)
    return recall, fp


def test_shape_flags_recall_and_false_positives_synthetic_profile():
    mean, sigma = qwen_like_profile(2560)
    for seed in (1, 2):
        recall, fp = _recall_and_fp(mean, sigma, seed)
        assert recall >= 0.99 and fp <= 0.01, (recall, fp)


def test_shape_flags_recall_and_false_positives_real_profile(reference_stats_npz):
    mean, sigma = load_profile(reference_stats_npz)
    recall, fp = _recall_and_fp(mean, sigma, 3)
    assert recall >= 0.99 and fp <= 0.01, (recall, fp)


def test_shape_flags_ignores_noise_and_constant_dims():
    g = np.random.default_rng(4)
    a, b = g.standard_normal((4000, 50)), g.standard_normal((4000, 50))
    a[:, 3] = b[:, 3] = 7.0
    ra, rb = DimStats(50, 0), DimStats(50, 0)
    ra.update(torch.from_numpy(a))
    rb.update(torch.from_numpy(b))
    assert shape_flags(ra, rb).flagged == []
    with pytest.raises(ValueError, match="at least 4"):
        shape_flags(DimStats(50, 0), rb)


def test_mixed_dims():
    g = np.random.default_rng(5)
    y = g.standard_normal((3000, 8)) * np.array([1, 2, 3, 4, 5, 6, 7, 8.0])
    x = y.copy()
    x[:, 0] = 0.6 * y[:, 0] + 0.8 * y[:, 1] / 2  # σ kept, correlation 0.6
    x[:, 2] = 3 * y[:, 2]  # σ ×3: an outlier, not "mixed"
    x[:, 5] = y[:, 5] + 0.05 * g.standard_normal(3000)
    s = PairSums(8, full=False)
    s.update(torch.from_numpy(x), torch.from_numpy(y))
    res = mixed_dims(s)
    assert res.mixed == [0]
    np.testing.assert_allclose(res.correlation.numpy(), [np.corrcoef(x[:, d], y[:, d])[0, 1] for d in range(8)],
                               rtol=1e-5)
    np.testing.assert_allclose(res.sigma_ratio.numpy(), x.std(0) / y.std(0), rtol=1e-5)


def _cap(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CapEmbedder.from_weights(torch.rand(dim, generator=g) + 0.5, torch.randn(24, dim, generator=g) / dim ** 0.5,
                                    torch.randn(24, generator=g), eps=1e-5)


def test_token_similarity_equals_explicit():
    g = np.random.default_rng(6)
    mean, sigma = qwen_like_profile(16)
    y = mean + sigma * g.standard_normal((200, 16))
    x = y + 0.2 * sigma * g.standard_normal((200, 16))
    cap = _cap(16)
    for c in (cap, None):
        ts = TokenSimilarity(torch.from_numpy(mean), torch.from_numpy(sigma), c)
        ts.update(torch.from_numpy(x[:120]), torch.from_numpy(y[:120]))
        ts.update(torch.from_numpy(x[120:]), torch.from_numpy(y[120:]))
        r = ts.result()

        def cos(a, b):
            return np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))

        xs, ys = (x - mean) / sigma, (y - mean) / sigma
        if c is None:
            f = lambda v: v / np.sqrt((v * v).mean(1, keepdims=True) + np.finfo(np.float32).eps)  # noqa: E731
        else:
            gn, w, b = (t.numpy() for t in (c.gain, c.weight, c.bias))
            f = lambda v: (v / np.sqrt((v * v).mean(1, keepdims=True) + 1e-5) * gn) @ w.T + b  # noqa: E731
        fx, fy = f(x), f(y)
        assert r["cosine"] == pytest.approx(cos(x, y), rel=1e-10)
        assert r["standardised_cosine"] == pytest.approx(cos(xs, ys), rel=1e-10)
        assert r["caption_cosine"] == pytest.approx(cos(fx, fy), rel=1e-10)
        assert r["standardised_error"] == pytest.approx(((xs - ys) ** 2).sum() / (ys ** 2).sum(), rel=1e-10)
        assert r["caption_error"] == pytest.approx(((fx - fy) ** 2).sum() / ((fy - fy.mean(0)) ** 2).sum(), rel=1e-9)
    assert r["caption_cosine"] == pytest.approx(r["cosine"], rel=1e-9)  # the proxy is scale-free


def test_dit_verdict_fails_mixed_target_and_passes_small_noise():
    g = np.random.default_rng(7)
    dim = 256
    mean, sigma = qwen_like_profile(dim)
    z = g.standard_normal((2000, dim))
    y = mean + sigma * z
    mix = near_identity_mix(dim, 0.35, seed=7)
    cases = {"noise": y + 0.03 * sigma * g.standard_normal(y.shape), "mixed": mean + sigma * (z @ mix.T)}
    out = {}
    for name, x in cases.items():
        ts = TokenSimilarity(torch.from_numpy(mean), torch.from_numpy(sigma))
        ts.update(torch.from_numpy(x), torch.from_numpy(y))
        r = ts.result()
        ratio = x.std(0) / y.std(0)
        seeds = verdict(r["cosine"], np.corrcoef(x.std(0), y.std(0))[0, 1], np.corrcoef(x.mean(0), y.mean(0))[0, 1],
                        int(((ratio > 3) | (ratio < 1 / 3)).sum()))
        out[name] = (dit_verdict(seeds, r["standardised_cosine"]), seeds)
    assert out["noise"][0].passed and out["noise"][1].passed
    assert out["mixed"][1].passed and not out["mixed"][0].passed  # the seeds pass what the DiT sees as wrong
    assert out["mixed"][0].cosine < 0.99
    assert "FAIL" in out["mixed"][0].to_markdown()
    assert dit_verdict(out["noise"][1], 0.999, caption_cosine=0.95).space == "caption"
    assert not dit_verdict(out["noise"][1], 0.999, caption_cosine=math.nan).passed
