"""Blending: alignment modes, anti-aliasing, outlier handling, RMS matching, NaN safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimfix import blend
from dimfix.fixtable import FixTable

D = 6


def table_with_outliers() -> FixTable:
    # dim 1: secondary 10x too wide (high), dim 2: 10x too narrow (low), others matched.
    return FixTable(reference_mean=torch.tensor([0.0, 5, -3, 0, 0, 0]), reference_std=torch.ones(D),
                    target_mean=torch.tensor([0.0, 1, 2, 0, 0, 0]), target_std=torch.tensor([1.0, 10, 0.1, 1, 1, 1]))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", blend.ALIGN_MODES)
@pytest.mark.parametrize("t2,length", [(1, 7), (7, 1), (10, 4), (4, 10), (5, 5), (1, 1)])
def test_align_lengths_and_finite(mode, t2, length):
    x = rand(2, t2, D)
    out = blend.align(x, length, mode, pad_value=torch.zeros(D) if mode == "pad_mean" else None)
    assert out.shape == (2, length, D) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert blend.align(x[0], length, mode, pad_value=torch.zeros(D) if mode == "pad_mean" else None).shape == (length, D)


def test_pool_equals_block_means():
    x = torch.arange(12.0).reshape(1, 12, 1).expand(1, 12, D)
    out = blend.align(x, 4, "pool")
    assert out[0, :, 0].tolist() == [1.0, 4.0, 7.0, 10.0]  # means of 0-2, 3-5, 6-8, 9-11


def test_truncate_pads_with_own_mean_never_zeros():
    x = torch.tensor([[1.0] * D, [3.0] * D])
    out = blend.align(x, 5, "truncate")
    assert torch.equal(out[:2], x) and torch.all(out[2:] == 2.0)
    assert torch.equal(blend.align(x, 1, "truncate"), x[:1])
    ref = torch.arange(D, dtype=torch.float32)
    padded = blend.align(x, 4, "pad_mean", pad_value=ref)
    assert torch.equal(padded[2], ref) and torch.equal(padded[3], ref)
    with pytest.raises(ValueError, match="pad_mean' needs pad_value"):
        blend.align(x, 4, "pad_mean")


def test_interp_is_anti_aliased():
    t2, length = 990, 10  # shrink ×99: naive linear sampling lands on single input tokens
    alt = torch.tensor([(-1.0) ** i for i in range(t2)]).reshape(1, t2, 1).expand(1, t2, D) + 5.0
    naive = F.interpolate(alt.transpose(1, 2), size=length, mode="linear", align_corners=False).transpose(1, 2)
    assert (naive - 5.0).abs().min() > 0.9  # aliasing: every output is a single ±1 sample
    out = blend.align(alt, length, "interp")
    assert (out - 5.0).abs().max() < 0.02  # low-passed: ≈ the signal's mean
    # growing is plain linear interpolation
    x = rand(1, 4, D)
    lin = F.interpolate(x.transpose(1, 2), size=9, mode="linear", align_corners=False).transpose(1, 2)
    torch.testing.assert_close(blend.align(x, 9, "interp"), lin)


def test_alpha_one_returns_primary_and_alpha_zero_the_aligned_secondary():
    p, s = rand(1, 5, D), rand(1, 9, D, seed=1)
    assert torch.equal(blend.blend(p, s, 1.0), p)
    torch.testing.assert_close(blend.blend(p, s, 0.0), blend.align(s, 5, "pool"))
    out = blend.blend(p, s, 0.8)
    torch.testing.assert_close(out, 0.8 * p + 0.2 * blend.align(s, 5, "pool"))
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\]"):
        blend.blend(p, s, 1.2)


@pytest.mark.parametrize("tp,ts", [(1, 1), (1, 8), (8, 1), (3, 17), (17, 3)])
@pytest.mark.parametrize("align", blend.ALIGN_MODES)
def test_blend_no_nan_for_short_and_mismatched_sequences(tp, ts, align):
    p = rand(1, tp, D)
    s = rand(1, ts, D, seed=2)
    s[..., 3] = 4.0  # zero-variance dim
    out = blend.blend(p, s, 0.7, align=align, outliers="rescale", table=table_with_outliers(), rms_match=True)
    assert out.shape == p.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("outliers", blend.OUTLIER_MODES)
@pytest.mark.parametrize("align", blend.ALIGN_MODES)
def test_blend_no_nan_with_zero_sigma_table_dims(outliers, align):
    """A table whose σ is 0 on either side (a dead reference dim, a constant target dim), with constant data
    there too and T = 1 on both sides: every output value is finite."""
    t = FixTable(reference_mean=torch.tensor([0.0, 5, -3, 0, 1, 0]),
                 reference_std=torch.tensor([1.0, 0.0, 1, 0, 1, 1]),
                 target_mean=torch.tensor([0.0, 1, 2, 0, 1, 0]),
                 target_std=torch.tensor([1.0, 10, 0.0, 0, 1, 1]))
    for tp, ts in ((1, 1), (4, 9)):
        p = rand(1, tp, D)
        s = rand(1, ts, D, seed=5)
        s[..., 2] = 2.0
        s[..., 3] = 0.0
        out = blend.blend(p, s, 0.7, align=align, outliers=outliers, table=t, rms_match=True)
        assert out.shape == p.shape and torch.isfinite(out).all(), (tp, ts)


def test_blend_dtype_batch_and_no_in_place():
    p = rand(2, 4, D).to(torch.bfloat16)
    s = rand(1, 6, D, seed=3).to(torch.float16)
    pk, sk = p.clone(), s.clone()
    out = blend.blend(p, s, 0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, D)
    assert torch.equal(p, pk) and torch.equal(s, sk)
    with pytest.raises(ValueError, match="primary width 6 differs from secondary width 5"):
        blend.blend(p, rand(1, 4, 5), 0.5)
    with pytest.raises(ValueError, match="secondary batch 3"):
        blend.blend(p, rand(3, 4, D), 0.5)


def test_rms_match_gives_target_rms():
    x, like = rand(2, 7, 64) * 3 + 1, rand(2, 7, 64, seed=5) * 50
    like[0, 0] *= 100  # a sink-like token
    out = blend.rms_match(x, like)
    rms = lambda t: t.double().pow(2).mean(-1).sqrt().numpy()  # noqa: E731
    np.testing.assert_allclose(rms(out), rms(like), rtol=1e-6)
    # direction per token unchanged
    cos = F.cosine_similarity(out, x, dim=-1)
    assert torch.all(cos > 0.99999)
    zero = torch.zeros(1, 2, 64)
    assert torch.equal(blend.rms_match(zero, like[:1, :2]), zero)  # eps guard: no NaN, unchanged
    with pytest.raises(ValueError, match="aligned"):
        blend.rms_match(x, like[:, :3])


def test_outlier_modes_on_known_outlier_dims():
    t = table_with_outliers()
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 4000, D, generator=g) * t.target_std + t.target_mean
    assert torch.equal(blend.handle_outliers(s, t, "none"), s)
    mean = blend.handle_outliers(s, t, "mean")
    assert torch.all(mean[..., 1] == 5.0) and torch.all(mean[..., 2] == -3.0)
    assert torch.equal(mean[..., [0, 3, 4, 5]], s[..., [0, 3, 4, 5]])
    resc = blend.handle_outliers(s, t, "rescale")
    std, m = resc[0].double().std(0), resc[0].double().mean(0)
    s_std, s_mean = s[0].double().std(0), s[0].double().mean(0)
    # high dim: σ -> τ·σ_ref = 3·σ_tgt_measured/10; low dim: σ -> σ_ref/τ; about the secondary's mean μ_tgt
    np.testing.assert_allclose(std[1].item(), s_std[1].item() * 3 / 10, rtol=1e-5)
    np.testing.assert_allclose(std[2].item(), s_std[2].item() * (1 / 3) / 0.1, rtol=1e-5)
    np.testing.assert_allclose(m[[1, 2]].numpy(), s_mean[[1, 2]].numpy(), atol=0.05)
    assert torch.equal(resc[..., 0], s[..., 0])
    cl = blend.handle_outliers(s, t, "clamp")  # no percentiles: μ_ref ± 3σ_ref on flagged dims
    assert cl[..., 1].min() >= 2.0 and cl[..., 1].max() <= 8.0
    assert cl[..., 2].min() >= -6.0 and cl[..., 2].max() <= 0.0
    assert torch.equal(cl[..., 0], s[..., 0])
    with pytest.raises(ValueError, match="needs a fix table"):
        blend.handle_outliers(s, None, "mean")
    with pytest.raises(ValueError, match="outlier handling must be one of"):
        blend.handle_outliers(s, t, "zero")


def test_outlier_clamp_uses_reference_percentiles_when_present():
    t = table_with_outliers()
    t.extras["reference_p0_1"] = torch.full((D,), -1.0)
    t.extras["reference_p99_9"] = torch.full((D,), 1.5)
    s = rand(1, 50, D) * 10
    out = blend.handle_outliers(s, t, "clamp")
    assert out[..., [1, 2]].min() >= -1.0 and out[..., [1, 2]].max() <= 1.5
    assert torch.equal(out[..., 0], s[..., 0])
