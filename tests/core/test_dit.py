import math

import numpy as np
import pytest
import torch

from dimfix import dit


def cap_features(x, gain, weight, bias=None, eps=1e-5, dtype=torch.float32):
    return dit.CapEmbedder.from_weights(gain, weight, bias, eps).features(x).to(dtype)


def _modules(d=6, dim=4, eps=1e-5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.RMSNorm(d, eps=eps, dtype=torch.float64)
    lin = torch.nn.Linear(d, dim, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen, dtype=torch.float64))
        lin.weight.copy_(torch.randn(dim, d, generator=gen, dtype=torch.float64))
        lin.bias.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
    return norm, lin


def test_cap_sensitivity_hand_example():
    gain = torch.tensor([2.0, -0.5, 0.0])
    weight = torch.tensor([[3.0, 1.0, 7.0], [4.0, 0.0, 1.0]])  # column norms 5, 1, sqrt(50)
    s = dit.cap_sensitivity(gain, weight)
    assert s.dtype == torch.float32
    assert s.tolist() == [10.0, 0.5, 0.0]
    sw = dit.cap_sensitivity(gain, weight, sigma_ref=torch.tensor([0.5, 4.0, 9.0]))
    assert sw.tolist() == [5.0, 2.0, 0.0]


def test_cap_sensitivity_bf16_weights_upcast():
    gain = torch.tensor([1.5, 3.0], dtype=torch.bfloat16)
    weight = torch.tensor([[1.0, 2.0], [2.0, 2.0]], dtype=torch.bfloat16)
    s = dit.cap_sensitivity(gain, weight)
    np.testing.assert_allclose(s.numpy(), [1.5 * math.sqrt(5.0), 3.0 * math.sqrt(8.0)], rtol=1e-7)


def test_cap_sensitivity_shape_errors():
    with pytest.raises(ValueError, match=r"\[dim, 3\]"):
        dit.cap_sensitivity(torch.ones(3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="sigma_ref"):
        dit.cap_sensitivity(torch.ones(3), torch.ones(4, 3), sigma_ref=torch.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        dit.cap_sensitivity(torch.tensor([1.0, float("nan")]), torch.ones(2, 2))


def test_rank_dims_orders_by_score():
    s = torch.tensor([1.0, 10.0, 2.0, 5.0, 0.0])
    lr = torch.tensor([math.log(3.0), 0.0, -math.log(4.0), math.log(2.0), 9.0])
    rows = dit.rank_dims(s, lr, top=3)
    assert [r["dim"] for r in rows] == [3, 2, 0]  # 5·ln2=3.47, 2·ln4=2.77, 1·ln3=1.10
    assert rows[0]["score"] == pytest.approx(5 * math.log(2.0))
    assert rows[1]["ratio"] == pytest.approx(0.25)
    assert rows[1]["log_ratio"] == pytest.approx(-math.log(4.0))
    assert len(dit.rank_dims(s, lr, top=99)) == 5
    assert dit.rank_dims(s, lr, top=0) == []


def test_rank_dims_non_finite_last_and_ties_stable():
    s = torch.tensor([1.0, 1.0, float("nan"), 1.0])
    lr = torch.tensor([1.0, -1.0, 5.0, 1.0])
    assert [r["dim"] for r in dit.rank_dims(s, lr, top=4)] == [0, 1, 3, 2]


def test_cap_features_match_torch_modules():
    norm, lin = _modules(d=6, dim=4, eps=1e-5)
    x = torch.randn(2, 5, 6, dtype=torch.float64) * 30
    x_before = x.clone()
    with torch.no_grad():
        expected = lin(norm(x))
    got = cap_features(x, norm.weight, lin.weight, lin.bias, eps=1e-5, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, x_before)
    got32 = cap_features(x.float(), norm.weight.float(), lin.weight.float(), lin.bias.float(), eps=1e-5)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-5)


def test_cap_features_hand_example_and_no_bias():
    # x = [3, 4]: mean(x²) = 12.5; eps 0 → x/rms = [3, 4]/sqrt(12.5)
    x = torch.tensor([[3.0, 4.0]])
    gain = torch.tensor([1.0, 2.0])
    weight = torch.tensor([[1.0, 1.0]])
    got = cap_features(x, gain, weight, None, eps=0.0, dtype=torch.float64)
    assert got.item() == pytest.approx((3.0 + 8.0) / math.sqrt(12.5), rel=1e-15)


def test_rmsnorm_scale_invariance():
    """A per-token scalar on x leaves the caption features unchanged (up to eps)."""
    norm, lin = _modules(d=8, dim=5, eps=1e-6, seed=3)
    x = torch.randn(7, 8, dtype=torch.float64) * 10
    scales = torch.tensor([1.15, 0.5, 3.0, 100.0, 1.0, 0.9, 7.0], dtype=torch.float64)[:, None]
    f1 = cap_features(x, norm.weight, lin.weight, lin.bias, eps=1e-6, dtype=torch.float64)
    f2 = cap_features(x * scales, norm.weight, lin.weight, lin.bias, eps=1e-6, dtype=torch.float64)
    # only eps breaks the invariance: relative effect ≤ eps / mean(x²) (≈ 1e-8 here)
    torch.testing.assert_close(f1, f2, rtol=1e-6, atol=1e-6)
    g0 = cap_features(x, norm.weight, lin.weight, lin.bias, eps=0.0, dtype=torch.float64)
    g1 = cap_features(x * scales, norm.weight, lin.weight, lin.bias, eps=0.0, dtype=torch.float64)
    torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-12)
    assert float(dit.token_cosine64(f1, f2).mean()) == pytest.approx(1.0, abs=1e-7)
    # ...while a per-dim change is not invisible
    y = x.clone()
    y[:, 2] *= 5.0
    f3 = cap_features(y, norm.weight, lin.weight, lin.bias, eps=1e-6, dtype=torch.float64)
    assert (f3 - f1).abs().max() > 1e-2


def test_caption_space_cosine_against_modules():
    """What the analysis computes: token cosine of the caption features of aligned tokens."""
    norm, lin = _modules(d=6, dim=4, eps=1e-5, seed=1)
    ref = torch.randn(5, 6, dtype=torch.float64)
    tgt = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        fa, fb = lin(norm(ref)), lin(norm(tgt))
    expected = torch.nn.functional.cosine_similarity(fa, fb, dim=-1)
    cap = dit.CapEmbedder.from_weights(norm.weight, lin.weight, lin.bias, 1e-5)
    cos = dit.token_cosine64(cap.features(ref), cap.features(tgt))
    torch.testing.assert_close(cos, expected, rtol=1e-6, atol=1e-6)


def test_token_cosine64_matches_numpy():
    g = np.random.default_rng(1)
    a = g.normal(size=(2, 9, 16))
    b = g.normal(size=(2, 9, 16))
    a[:, 0, 4] = 1.35e4  # sink-sized value
    b[:, 0, 4] = 9.0e3
    ref = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    got = dit.token_cosine64(torch.from_numpy(a).float(), torch.from_numpy(b))
    assert got.shape == (2, 9) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-7)
    bf = dit.token_cosine64(torch.from_numpy(a).to(torch.bfloat16), torch.from_numpy(b))
    np.testing.assert_allclose(bf.numpy(), ref, rtol=0, atol=1e-2)  # bf16-rounded input: close, not exact
    b = torch.from_numpy(b[0])
    z = torch.zeros(1, 16, dtype=torch.float64)
    assert torch.isnan(dit.token_cosine64(z, b[:1])).all()


def test_cap_embedder_errors():
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        cap_features(torch.ones(2, 4), torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="bias"):
        cap_features(torch.ones(2, 3), torch.ones(3), torch.ones(2, 3), torch.ones(3))


def test_cap_embedder_object_matches_modules():
    norm, lin = _modules(d=6, dim=4, eps=1e-5, seed=2)
    cap = dit.CapEmbedder.from_weights(norm.weight.float(), lin.weight.float(), lin.bias.float(), eps=1e-5)
    assert cap.in_dim == 6 and cap.weight.dtype == torch.float64
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = lin(norm(x.double()))
    torch.testing.assert_close(cap.features(x), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(cap.sensitivity(), dit.cap_sensitivity(norm.weight.float(), lin.weight.float()))
    eps_default = dit.CapEmbedder.from_weights(torch.ones(2), torch.ones(1, 2), eps=None).eps
    assert eps_default == torch.finfo(torch.float32).eps  # like torch.nn.RMSNorm(eps=None)
