"""Fix modes: hand-computed legacy formulas, improved modes, strength, scope, dtypes, purity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dimfix import fixes, tokens
from dimfix.config import Thresholds
from dimfix.fixtable import FixTable, FixTableMeta

# A hand-made table (default thresholds: τ = 3, dead σ < 0.01, hyperactive σ > 5 × lower median).
REF_MEAN = [0, 1, 2, 3, 4, 5, 6, 7]
REF_STD = [1, 1, 1, 1, 1, 1, 1, 2]
TGT_MEAN = [1, 0, 0, 0, 0, 0, 0, 0]
TGT_STD = [4, 0.2, 0.005, 1, 2, 1, 50, 1.5]
# ratios σ_tgt/σ_ref = [4, .2, .005, 1, 2, 1, 50, .75] -> high {0, 6}, low {1, 2};
# target lower median σ = 1 -> target-only dead {2} (σ < 0.01), target-only hyperactive {6} (σ > 5).
X = [[5, 1, 0.01, 2, 3, 4, 200, 1],
     [-3, -1, 0.02, 0, 1, 0, -200, 2],
     [1, 0.5, -0.01, 1, -1, 2, 10, -1]]

# rescale: x[:, d] *= σ_ref/σ_tgt on {0: ×0.25, 1: ×5, 2: ×200, 6: ×0.02}, about 0.
RESCALED = [[1.25, 5, 2, 2, 3, 4, 4, 1],
            [-0.75, -5, 4, 0, 1, 0, -4, 2],
            [0.25, 2.5, -2, 1, -1, 2, 0.2, -1]]
# mask: rescale, then target-only dead dim 2 -> 0.
MASKED = [[1.25, 5, 0, 2, 3, 4, 4, 1],
          [-0.75, -5, 0, 0, 1, 0, -4, 2],
          [0.25, 2.5, 0, 1, -1, 2, 0.2, -1]]
# clamp: mask, then target-only hyperactive dim 6 clamped to ±3·σ_ref = ±3 (about 0).
CLAMPED = [[1.25, 5, 0, 2, 3, 4, 3, 1],
           [-0.75, -5, 0, 0, 1, 0, -3, 2],
           [0.25, 2.5, 0, 1, -1, 2, 0.2, -1]]
# full: (x - μ_tgt)/σ_tgt·σ_ref + μ_ref on every dim.
FULL = [[1, 6, 4, 5, 5.5, 9, 10, 1 * 4 / 3 + 7],
        [-1, -4, 6, 3, 4.5, 5, 2, 2 * 4 / 3 + 7],
        [0, 3.5, 0, 4, 3.5, 7, 6.2, -4 / 3 + 7]]


def hand_table(**kw) -> FixTable:
    f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return FixTable(f(REF_MEAN), f(REF_STD), f(TGT_MEAN), f(TGT_STD), **kw)


def apply_fix(x, table, mode, *, strength=1.0, scope="all", labels=None, thresholds=None):
    """What Embedding Dimension Fix does: plan the mode, apply it on the token scope."""
    return fixes.apply_scoped(x, fixes.plan_fix(table, mode, strength, thresholds), scope, labels)


def x_hand() -> torch.Tensor:
    return torch.tensor(X, dtype=torch.float32).unsqueeze(0)


@pytest.mark.parametrize("mode,expected", [("none", X), ("rescale", RESCALED), ("mask", MASKED),
                                           ("clamp", CLAMPED), ("full", FULL)])
def test_seed_modes_match_hand_computed_origin_formulas(mode, expected):
    out = apply_fix(x_hand(), hand_table(), mode)
    np.testing.assert_allclose(out[0].numpy(), np.array(expected, dtype=np.float64), rtol=1e-5, atol=1e-5)


def test_classification_of_the_hand_table():
    flags = fixes.classify_dims(hand_table())
    assert torch.nonzero(flags.high).flatten().tolist() == [0, 6]
    assert torch.nonzero(flags.low).flatten().tolist() == [1, 2]
    assert torch.nonzero(flags.target_only_dead).flatten().tolist() == [2]
    assert torch.nonzero(flags.target_only_hyper).flatten().tolist() == [6]


def test_legacy_mask_uses_the_origin_absolute_dead_rule():
    """Median σ 20: the scale-free dead rule (σ < 1e-3 × 20) flags σ_tgt = 0.015, the origin's σ < 0.01 does not,
    so legacy mask/clamp only rescale that dim (×20/0.015), exactly as the original apply_fixes did."""
    t = FixTable(torch.full((8,), 3.0), torch.full((8,), 20.0), torch.zeros(8),
                 torch.tensor([20.0] * 7 + [0.015]))
    assert bool(fixes.classify_dims(t).target_only_dead[7])  # the analysis' (scale-free) rule
    x = torch.tensor([[[1.0] * 7 + [0.01]]])
    for mode in ("rescale", "mask", "clamp"):
        out = apply_fix(x, t, mode)
        assert float(out[0, 0, 7]) == pytest.approx(0.01 * 20.0 / 0.015, rel=1e-6), mode
        assert torch.equal(out[0, 0, :7], x[0, 0, :7])
    # σ_tgt below the absolute threshold: zeroed by mask
    t = FixTable(t.reference_mean, t.reference_std, t.target_mean, torch.tensor([20.0] * 7 + [0.005]))
    assert float(apply_fix(x, t, "mask")[0, 0, 7]) == 0.0
    assert float(apply_fix(x, t, "mask_mean")[0, 0, 7]) == 3.0


def test_legacy_guards_tiny_reference_and_target_std():
    # σ_ref < 1e-6 -> ratio denominator 1 (σ_tgt = 2 is then not an outlier); σ_tgt ≤ 1e-6 -> dim skipped.
    t = FixTable(torch.zeros(4), torch.tensor([0.0, 1, 1, 1]), torch.zeros(4), torch.tensor([2.0, 1e-7, 1, 1]))
    x = torch.tensor([[[3.0, 4.0, 5.0, 6.0]]])
    assert torch.equal(apply_fix(x, t, "rescale"), x)
    full = apply_fix(x, t, "full")
    # dim 0: (3 - 0)/2·0 + 0 = 0; dim 1 skipped; dims 2, 3 identity moments.
    assert full[0, 0].tolist() == [0.0, 4.0, 5.0, 6.0]


def test_thresholds_from_table_unless_overridden():
    t = hand_table(meta=FixTableMeta(thresholds=Thresholds(outlier_ratio=10.0)))
    # τ = 10: only dim 6 (ratio 50) and dim 2 (0.005) are outliers.
    assert fixes.plan_fix(t, "rescale").dims.tolist() == [2, 6]
    assert fixes.plan_fix(t, "rescale", thresholds=Thresholds()).dims.tolist() == [0, 1, 2, 6]


def synthetic(seed=0, d=64, n=4000):
    """Reference and target moments spanning 3 decades, target data drawn from the target moments."""
    rng = np.random.default_rng(seed)
    ref_std = np.exp(rng.uniform(0, np.log(1000), d))
    ref_mean = rng.normal(0, 5, d)
    tgt_std = ref_std * np.exp(rng.normal(0, 1.5, d))
    tgt_mean = ref_mean + rng.normal(0, 10, d)
    data = rng.normal(tgt_mean, tgt_std, size=(n, d))
    table = FixTable(torch.tensor(ref_mean), torch.tensor(ref_std), torch.tensor(data.mean(0)),
                     torch.tensor(data.std(0, ddof=1)))
    return table, torch.tensor(data, dtype=torch.float32).unsqueeze(0), ref_mean, ref_std


@pytest.mark.parametrize("mode", ["full", "affine"])
def test_full_and_affine_match_reference_std_profile(mode):
    table, x, ref_mean, ref_std = synthetic()
    before = np.corrcoef(x[0].double().numpy().std(0, ddof=1), ref_std)[0, 1]
    out = apply_fix(x, table, mode)[0].double().numpy()
    std = out.std(0, ddof=1)
    assert np.corrcoef(std, ref_std)[0, 1] > 0.99 > before
    np.testing.assert_allclose(std, ref_std, rtol=1e-3)
    np.testing.assert_allclose(out.mean(0), ref_mean, atol=1e-3 * ref_std.max())


def test_affine_partial_strength_interpolates_geometrically():
    table, x, ref_mean, ref_std = synthetic(seed=1, d=16, n=500)
    lam = 0.3
    out = apply_fix(x, table, "affine", strength=lam)[0].double().numpy()
    s_t, m_t = table.target_std.double().numpy(), table.target_mean.double().numpy()
    np.testing.assert_allclose(out.std(0, ddof=1), s_t ** (1 - lam) * ref_std ** lam, rtol=1e-4)
    np.testing.assert_allclose(out.mean(0), m_t + lam * (ref_mean - m_t), atol=1e-3 * ref_std.max())


def test_affine_degenerate_target_dims_never_nan():
    t = FixTable(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 0, 5]), torch.tensor([0.0, 0, 0]),
                 torch.tensor([0.0, 0, 1e-9]))
    x = torch.tensor([[[0.0, 0.0, 0.0], [1e-3, 0.0, 2e-9]]])
    out = apply_fix(x, t, "affine")
    assert torch.isfinite(out).all()
    # degenerate dims (σ_tgt ≤ eps_rel·σ_ref) only move their mean to μ_ref: x - μ_tgt + μ_ref.
    np.testing.assert_allclose(out[0].numpy(), (x[0] + torch.tensor([1.0, 2, 3])).numpy(), rtol=1e-6)


def test_mask_mean_uses_reference_mean():
    out = apply_fix(x_hand(), hand_table(), "mask_mean")[0]
    for d in (0, 1, 2, 6):  # outliers (two-sided) and the target-only dead dim
        assert torch.all(out[:, d] == REF_MEAN[d])
    assert torch.equal(out[:, [3, 4, 5, 7]], x_hand()[0][:, [3, 4, 5, 7]])


def test_clamp_pct_bounds_with_percentiles():
    table, x, _, _ = synthetic(seed=2, d=32, n=2000)
    ref = np.random.default_rng(3).normal(table.reference_mean.numpy(), table.reference_std.numpy(), (2000, 32))
    table.extras["reference_p0_1"] = torch.tensor(np.percentile(ref, 0.1, axis=0), dtype=torch.float32)
    table.extras["reference_p99_9"] = torch.tensor(np.percentile(ref, 99.9, axis=0), dtype=torch.float32)
    x = x * 3  # push values out of range
    plan = fixes.plan_fix(table, "clamp_pct")
    assert plan.notes == ()
    out = fixes.apply_plan(x, plan)[0]
    lo, hi = table.percentile("reference", 0.1), table.percentile("reference", 99.9)
    assert torch.all(out >= lo) and torch.all(out <= hi)
    # inside the range and not an outlier dim -> untouched
    flags = fixes.classify_dims(table)
    keep = ~flags.outlier
    inside = (x[0] >= lo) & (x[0] <= hi) & keep
    assert inside.any() and torch.equal(out[inside], x[0][inside])


def test_clamp_pct_falls_back_to_mean_k_sigma_and_says_so(caplog):
    t = hand_table()
    plan = fixes.plan_fix(t, "clamp_pct")
    assert plan.notes and "mean ± 3·std" in plan.notes[0]
    assert "no reference percentiles" in caplog.text
    out = fixes.apply_plan(x_hand(), plan)[0]
    mu, sd = torch.tensor(REF_MEAN, dtype=torch.float32), torch.tensor(REF_STD, dtype=torch.float32)
    assert torch.all(out >= mu - 3 * sd - 1e-5) and torch.all(out <= mu + 3 * sd + 1e-5)
    # dim 3 (not an outlier, σ ratio 1): values 2, 0, 1 with μ_ref 3 ± 3 -> unchanged
    assert out[:, 3].tolist() == [2.0, 0.0, 1.0]


@pytest.mark.parametrize("mode", fixes.MODES)
def test_strength_zero_is_identity_and_input_untouched(mode):
    x = x_hand()
    keep = x.clone()
    out = apply_fix(x, hand_table(), mode, strength=0.0)
    assert torch.equal(out, x) and out is not x
    full = apply_fix(x, hand_table(), mode)
    assert torch.equal(x, keep)
    assert full.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("mode", ["rescale", "clamp", "mask_mean", "full"])
def test_partial_strength_interpolates_legacy_modes(mode):
    x = x_hand()
    full = apply_fix(x, hand_table(), mode)
    half = apply_fix(x, hand_table(), mode, strength=0.25)
    torch.testing.assert_close(half, 0.75 * x + 0.25 * full, rtol=1e-5, atol=1e-5)


def test_strength_out_of_range_and_unknown_mode():
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        fixes.plan_fix(hand_table(), "full", strength=1.5)
    with pytest.raises(ValueError, match="fix mode must be one of none, rescale"):
        fixes.plan_fix(hand_table(), "fancy")


def test_content_scope_leaves_sink_and_template_bit_identical():
    torch.manual_seed(0)
    t = 14
    x = torch.randn(2, t, 8) * 7
    labels = tokens.classify_positions(t)
    out = apply_fix(x, hand_table(), "full", scope="content")
    content = labels == int(tokens.TokenClass.CONTENT)
    assert torch.equal(out[:, ~content], x[:, ~content])
    torch.testing.assert_close(out[:, content], apply_fix(x, hand_table(), "full")[:, content])
    nosink = apply_fix(x, hand_table(), "full", scope="no_sink")
    assert torch.equal(nosink[:, 0], x[:, 0]) and not torch.equal(nosink[:, 1], x[:, 1])
    # explicit labels: an appended EOS is also left alone
    lab = labels.clone()
    lab[-1] = int(tokens.TokenClass.APPENDED_EOS)
    assert torch.equal(apply_fix(x, hand_table(), "full", scope="no_sink", labels=lab)[:, -1], x[:, -1])
    with pytest.raises(ValueError, match="token scope"):
        apply_fix(x, hand_table(), "full", scope="prompt")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_same_dtype_out_computed_in_fp32(dtype):
    x = x_hand().to(dtype)
    for mode in ("full", "clamp", "affine"):
        out = apply_fix(x, hand_table(), mode)
        assert out.dtype == dtype
        expected = apply_fix(x.float(), hand_table(), mode).to(dtype)
        assert torch.equal(out, expected)
    # random values: fp32-then-cast differs from arithmetic done in half precision
    xr = (torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    plan = fixes.plan_fix(hand_table(), "full")
    out = fixes.apply_plan(xr, plan)
    assert torch.equal(out, fixes.apply_plan(xr.float(), plan).to(dtype))
    assert not torch.equal(out, xr * plan.scale.to(dtype) + plan.shift.to(dtype))


def test_width_mismatch_names_both_widths():
    with pytest.raises(ValueError, match="embedding width 9 does not match the fix plan's width 8"):
        apply_fix(torch.zeros(1, 3, 9), hand_table(), "full")


@pytest.mark.parametrize("n_dims,n_bounded", [(0, 3), (0, 20), (2, 0), (2, 3), (2, 20), (60, 0), (60, 3), (60, 20)])
def test_apply_equals_naive_formula(n_dims, n_bounded):
    g = torch.Generator().manual_seed(n_dims * 100 + n_bounded)
    d = 64
    scale, shift = torch.ones(d), torch.zeros(d)
    idx = torch.randperm(d, generator=g)[:n_dims]
    scale[idx] = torch.rand(n_dims, generator=g) * 3
    shift[idx] = torch.randn(n_dims, generator=g)
    lo = hi = None
    if n_bounded:
        lo, hi = torch.full((d,), -float("inf")), torch.full((d,), float("inf"))
        cl = torch.randperm(d, generator=g)[:n_bounded]
        lo[cl], hi[cl] = -0.5, 0.7
    plan = fixes.FixPlan(mode="test", strength=1.0, scale=scale, shift=shift, lo=lo, hi=hi)
    x = torch.randn(2, 9, d, generator=g)
    naive = x * scale + shift
    if n_bounded:
        naive = torch.maximum(torch.minimum(naive, hi), lo)
    torch.testing.assert_close(fixes.apply_plan(x, plan), naive, rtol=1e-6, atol=1e-6)
    assert plan.dims.numel() == int(((scale != 1) | (shift != 0) | (torch.isfinite(lo) if n_bounded else False)).sum())


@pytest.mark.parametrize("pattern", ["prefix_suffix", "mostly_excluded", "alternating", "none", "all", "2d"])
def test_token_masks_equal_a_where(pattern):
    """1-D masks (index copies of the excluded tokens) and 2-D masks give what a plain
    ``where(mask, fixed, x)`` gives; a token scope equals its explicit mask."""
    g = torch.Generator().manual_seed(len(pattern))
    t = 40
    m = torch.ones(t, dtype=torch.bool)
    if pattern == "prefix_suffix":
        m[:3] = False
        m[-5:] = False
    elif pattern == "mostly_excluded":
        m[:] = False
        m[10:14] = True
        m[30] = True
    elif pattern == "alternating":
        m[::2] = False
    elif pattern == "none":
        m[:] = False
    elif pattern == "2d":
        m = torch.rand(2, t, generator=g) > 0.5
    x = torch.randn(2, t, 8, generator=g) * 5
    plan = fixes.plan_fix(hand_table(), "clamp")
    expected = torch.where(m.unsqueeze(-1), fixes.apply_plan(x, plan), x)
    snap = x.clone()
    assert torch.equal(fixes.apply_plan(x, plan, m), expected) and torch.equal(x, snap)
    for scope in ("content", "no_sink"):
        explicit = fixes.apply_plan(x, plan, fixes.token_mask_for(t, scope))
        assert torch.equal(fixes.apply_scoped(x, plan, scope), explicit)


def test_real_reference_two_sided_outliers(reference_stats_npz):
    z = np.load(reference_stats_npz)
    ref_mean, ref_std = z["per_dim_mean"].astype(np.float64), z["per_dim_std"].astype(np.float64)
    tgt_std = ref_std.copy()
    tgt_std[396] = ref_std[396] / 617.9  # the "617x" dim of the VL research: too NARROW, not too wide
    tgt_std[4] = ref_std[4] * 42.0
    table = FixTable(torch.tensor(ref_mean), torch.tensor(ref_std), torch.tensor(ref_mean), torch.tensor(tgt_std))
    flags = fixes.classify_dims(table)
    assert torch.nonzero(flags.outlier).flatten().tolist() == [4, 396]
    assert bool(flags.low[396]) and bool(flags.high[4])
    # reference hyperactive set, as documented for this file (σ > 5 × median 5.588)
    assert torch.nonzero(flags.reference_hyper).flatten().tolist() == [0, 4, 9, 19, 56, 100, 342, 396]
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(ref_mean, tgt_std, (300, 2560)), dtype=torch.float32).unsqueeze(0)
    out = apply_fix(x, table, "affine")[0].double().numpy()
    ratio = out.std(0, ddof=1)[[4, 396]] / ref_std[[4, 396]]
    assert np.all(np.abs(ratio - 1) < 0.2)


def test_fix_follows_table_changes_and_works_on_inference_tensors():
    t = hand_table()
    x = x_hand()
    first = apply_fix(x, t, "full")
    t.target_std = t.target_std * 2  # a replaced tensor is a new table value
    torch.testing.assert_close(apply_fix(x, t, "full"), fixes.apply_plan(x, fixes.plan_fix(t, "full")))
    assert not torch.equal(apply_fix(x, t, "full"), first)
    with torch.inference_mode():  # ComfyUI executes nodes under inference mode
        t2 = hand_table()
        torch.testing.assert_close(apply_fix(x_hand(), t2, "full"), first)


def test_plan_to_device_keeps_values():
    plan = fixes.plan_fix(hand_table(), "clamp")
    moved = plan.to("cpu")
    assert moved is not plan and torch.equal(moved.scale, plan.scale) and torch.equal(moved.hi, plan.hi)
    assert torch.equal(moved.dims, plan.dims)
    assert torch.equal(fixes.apply_plan(x_hand(), moved), fixes.apply_plan(x_hand(), plan))
