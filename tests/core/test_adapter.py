import numpy as np
import pytest
import torch

from dimfix.adapter import AdapterFitter, apply_affine, apply_lowrank, fit_adapters
from dimfix.eigenfit import HeldoutMoments, TrainBasis
from dimfix.pairs import PairSums, align_token_ids, is_heldout, rmsnorm_weights
from dimfix.tokens import ENDOFTEXT

SIG = np.array([2752.0, 949.0, 0.05, 5.6, 3.5, 12.0, 7.0, 1.0, 36.0, 4.2, 6.1, 5.0])
MU = np.array([925.0, -40.0, 3.0, 0.5, -7.9, 19.4, 2.0, 0.0, 10.0, -1.0, 0.3, 1.0])


def _pairs(n_prompts=30, per=25, dim=12, seed=0, noise=0.05, mix=None):
    g = np.random.default_rng(seed)
    sig, mu = SIG[:dim], MU[:dim]
    a = np.eye(dim) + 0.15 * g.standard_normal((dim, dim)) if mix is None else mix
    prompts = []
    for _ in range(n_prompts):
        z = g.standard_normal((per, dim))
        y = mu + sig * z
        x = mu + 0.3 * sig + sig * ((z + noise * g.standard_normal((per, dim))) @ a.T) * 1.7
        prompts.append((x, y))
    return prompts


def _sums(prompts, dim=12, metric=None, weights=None):
    s = PairSums(dim, metric_factor=metric)
    for i, (x, y) in enumerate(prompts):
        s.update(torch.from_numpy(x), torch.from_numpy(y), None if weights is None else weights[i])
    return s.flush()


def _stack(prompts):
    return np.concatenate([p[0] for p in prompts]), np.concatenate([p[1] for p in prompts])


def _ridge_ref(x, y, alpha, mu=MU, sig=SIG):
    """Independent closed-form ridge on the residual in reference-σ units (numpy)."""
    d = x.shape[1]
    xw, yw = (x - mu[:d]) / sig[:d], (y - mu[:d]) / sig[:d]
    mx, my = xw.mean(0), yw.mean(0)
    xc, rc = xw - mx, (yw - my) - (xw - mx)
    c = xc.T @ xc
    lam = alpha * np.trace(c) / d
    delta = np.linalg.solve(c + lam * np.eye(d), xc.T @ rc).T
    w_white = np.eye(d) + delta
    w = (sig[:d, None] * w_white) / sig[None, :d]
    b = mu[:d] + sig[:d] * (my - w_white @ mx) - w @ mu[:d]
    return w, b


def test_unregularised_fit_equals_numpy_lstsq():
    prompts = _pairs()
    fit = fit_adapters(_sums(prompts), None, MU, SIG, alphas=(0.0,))["adapter"]
    x, y = _stack(prompts)
    coef, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)
    assert fit.kind == "full"
    np.testing.assert_allclose(fit.weight.numpy(), coef[:-1].T, rtol=2e-4, atol=2e-5 * np.abs(coef).max())
    pred = fit.apply(torch.from_numpy(x).float()).double().numpy()
    ref = np.hstack([x, np.ones((len(x), 1))]) @ coef
    assert np.abs(pred - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("alpha", [1e-3, 0.3])
def test_ridge_equals_closed_form(alpha):
    prompts = _pairs(seed=1)
    fit = fit_adapters(_sums(prompts), None, MU, SIG, alphas=(alpha,))["adapter"]
    w, b = _ridge_ref(*_stack(prompts), alpha)
    np.testing.assert_allclose(fit.weight.numpy(), w, rtol=1e-4, atol=1e-6 * np.abs(w).max())
    np.testing.assert_allclose(fit.bias.numpy(), b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_heldout_and_train_errors_from_sums_equal_explicit():
    prompts = _pairs(n_prompts=40, seed=2)
    train, held = prompts[:30], prompts[30:]
    alphas = (0.0, 1e-2, 1.0)
    fits = fit_adapters(_sums(train), _sums(held), MU, SIG, alphas=alphas)
    xt, yt = _stack(train)
    xh, yh = _stack(held)
    white = lambda v: (v - MU) / SIG  # noqa: E731
    for a, e_ho in fits["adapter"].path:
        w, b = _ridge_ref(xt, yt, a)
        err = (white(xh @ w.T + b) - white(yh)) ** 2
        spread = (white(yh) - white(yh).mean(0)) ** 2
        assert e_ho == pytest.approx(err.sum() / spread.sum(), rel=1e-8)
    f = fits["adapter"]
    w, b = _ridge_ref(xt, yt, f.alpha)
    err_t = ((white(xt @ w.T + b) - white(yt)) ** 2).sum() / ((white(yt) - white(yt).mean(0)) ** 2).sum()
    assert f.train_error == pytest.approx(err_t, rel=1e-8)
    assert f.alpha == min(f.path, key=lambda t: t[1])[0]


def test_metric_and_weights_errors_equal_explicit():
    prompts = _pairs(n_prompts=40, seed=3)
    g = np.random.default_rng(9)
    a = torch.from_numpy(g.standard_normal((18, 12)) / SIG)
    wts = [rmsnorm_weights(torch.from_numpy(y)) for _, y in prompts]
    train = _sums(prompts[:30], metric=a, weights=wts[:30])
    held = _sums(prompts[30:], metric=a, weights=wts[30:])
    f = fit_adapters(train, held, MU, SIG, alphas=(1e-3,), ranks=(3,))
    xt, yt = _stack(prompts[:30])
    xh, yh = _stack(prompts[30:])
    wt, wh = torch.cat(wts[:30]).numpy(), torch.cat(wts[30:]).numpy()
    an = a.numpy()
    # weighted LS is M-independent at full rank: solve on sqrt(w)-scaled centred rows
    sw = np.sqrt(wt)[:, None]
    mx, my = (wt @ xt) / wt.sum(), (wt @ yt) / wt.sum()
    xw, yw = (xt - mx) / SIG * sw, (yt - my) / SIG * sw
    c = xw.T @ xw
    lam = 1e-3 * np.trace(c) / 12
    delta = np.linalg.solve(c + lam * np.eye(12), xw.T @ (yw - xw)).T
    w = (SIG[:, None] * (np.eye(12) + delta)) / SIG[None, :]
    b = my - w @ mx
    np.testing.assert_allclose(f["adapter"].weight.numpy(), w, rtol=1e-4, atol=1e-6 * np.abs(w).max())
    for fit in (f["adapter"], f["adapter_lowrank"]):
        ww, bb = (w, b) if fit.kind == "full" else (t.double().numpy() for t in fit.affine())
        ref = {}
        for key, x, y, wv in (("tr", xt, yt, wt), ("ho", xh, yh, wh)):
            e = ((x @ ww.T + bb - y) @ an.T) ** 2
            s = ((y - (wv @ y) / wv.sum()) @ an.T) ** 2
            ref[key] = (wv @ e.sum(1)) / (wv @ s.sum(1))
        assert fit.train_error == pytest.approx(ref["tr"], rel=1e-5)
        assert fit.heldout_error == pytest.approx(ref["ho"], rel=1e-5)


def test_merge_equals_one_pass():
    prompts = _pairs(n_prompts=12, seed=4)
    a = torch.randn(5, 12, dtype=torch.float64)
    one = _sums(prompts, metric=a)
    merged = _sums(prompts[:5], metric=a).merge(_sums(prompts[5:], metric=a))
    for name in ("mean_x", "mean_y", "cxx", "cxy", "dxx", "dxy", "dyy"):
        ref = getattr(one, name)
        assert torch.allclose(getattr(merged, name), ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    assert merged.qyy == pytest.approx(one.qyy, rel=1e-10)
    assert (merged.count, merged.n) == (one.count, one.n)
    x, y = _stack(prompts)
    np.testing.assert_allclose(one.cxy.numpy(), (x - x.mean(0)).T @ (y - y.mean(0)), rtol=1e-9,
                               atol=1e-9 * np.abs(one.cxy.numpy()).max())
    np.testing.assert_allclose(one.correlation().numpy(),
                               [np.corrcoef(x[:, d], y[:, d])[0, 1] for d in range(12)], rtol=1e-5)


@pytest.mark.parametrize("with_metric", [False, True])
def test_lowrank_matches_reduced_rank_regression(with_metric):
    g = np.random.default_rng(5)
    d, r = 12, 3
    u0, v0 = g.standard_normal((d, r)), g.standard_normal((d, r)) * 0.3
    prompts = []
    for _ in range(40):
        z = g.standard_normal((30, d))
        x = MU + SIG * z
        y = MU + SIG * ((z + z @ v0 @ u0.T) + 0.01 * g.standard_normal((30, d)))
        prompts.append((x, y))
    a = torch.from_numpy(g.standard_normal((20, d)) / SIG) if with_metric else None
    fit = fit_adapters(_sums(prompts, metric=a), None, MU, SIG, alphas=(0.0,), ranks=(r,))["adapter_lowrank"]
    assert fit.kind == "lowrank" and fit.rank == r
    x, y = _stack(prompts)
    xw, yw = (x - MU) / SIG, (y - MU) / SIG
    xc, rc = xw - xw.mean(0), (yw - yw.mean(0)) - (xw - xw.mean(0))
    full = np.linalg.lstsq(xc, rc, rcond=None)[0]  # Δ̂ᵀ
    mh = np.eye(d)
    if with_metric:
        mw = (a.numpy() * SIG).T @ (a.numpy() * SIG)
        ev, vec = np.linalg.eigh(mw)
        mh = (vec * np.sqrt(ev)) @ vec.T
    _, _, vt = np.linalg.svd(xc @ full @ mh, full_matrices=False)  # fitted values in the metric
    vr = vt[:r].T
    delta_r = np.linalg.solve(mh, vr @ vr.T @ mh @ full.T)
    ref = (SIG[:, None] * delta_r) / SIG[None, :]
    got = (fit.u.double() @ fit.v.double().T).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    xt = torch.from_numpy(x[:50]).float()
    w, b = fit.affine()
    assert torch.allclose(fit.apply(xt), apply_affine(xt, w, b), rtol=1e-4, atol=1e-2)


def test_fallbacks_are_finite_and_explained():
    prompts = _pairs(n_prompts=2, per=4, seed=6)  # 8 tokens for width 12
    fits = fit_adapters(_sums(prompts), None, MU, SIG)
    assert fits["adapter"].kind == "lowrank" and any("underdetermined" in n for n in fits["adapter"].notes)
    dead = [(np.where(np.arange(12) == 2, 4.0, x), y) for x, y in _pairs(seed=7)]  # dim 2 constant
    fits2 = fit_adapters(_sums(dead), _sums(_pairs(seed=8)), MU, SIG)
    assert any("ill-conditioned" in n for n in fits2["adapter"].notes) and fits2["adapter"].alpha > 0
    for out in (fits, fits2):
        for f in out.values():
            w, b = f.affine()
            assert torch.isfinite(w).all() and torch.isfinite(b).all()
    diag = PairSums(12, full=False)
    for x, y in dead:
        diag.update(torch.from_numpy(x), torch.from_numpy(y))
    pd = fit_adapters(diag, None, MU, SIG)["adapter"]
    assert pd.kind == "per_dim" and torch.isfinite(pd.weight).all()
    x, y = _stack(dead)
    out = pd.apply(torch.from_numpy(x))
    assert float(out[:, 2].std()) == 0.0 and float(out[0, 2]) == pytest.approx(y[:, 2].mean(), rel=1e-6)
    empty = fit_adapters(PairSums(12), None, MU, SIG)["adapter"]
    assert empty.kind == "identity" and "identity" in empty.notes[0]


def test_apply_keeps_dtype_and_input():
    x = torch.randn(1, 7, 12).to(torch.bfloat16)
    before = x.clone()
    w, b = torch.randn(12, 12), torch.randn(12)
    y = apply_affine(x, w, b)
    assert y.dtype == torch.bfloat16 and torch.equal(x, before)
    u, v, m, c = torch.randn(12, 2), torch.randn(12, 2), torch.randn(12), torch.randn(12)
    ref = x.float() + (x.float() - m) @ v @ u.T + c
    assert torch.allclose(apply_lowrank(x.float(), u, v, m, c), ref, atol=1e-4)
    with pytest.raises(ValueError, match="width"):
        apply_affine(torch.zeros(3, 5), w, b)


def test_align_token_ids():
    ids = [151644, 872, 198, 9, 10, 151645]
    assert align_token_ids(ids, ids)[0].tolist() == list(range(6))
    ix, iy = align_token_ids(ids + [ENDOFTEXT], ids)
    assert ix.tolist() == iy.tolist() == list(range(6))
    assert align_token_ids(ids, ids + [ENDOFTEXT])[1].tolist() == list(range(6))
    assert align_token_ids(ids[:3] + [11] + ids[4:], ids)[0].tolist() == [0, 1, 2, 4, 5]
    assert align_token_ids(ids, ids[:-2]) is None
    assert align_token_ids([1], [2]) is None


def test_heldout_split_is_deterministic():
    flags = [is_heldout(f"prompt number {i}") for i in range(4000)]
    assert flags == [is_heldout(f"prompt number {i}") for i in range(4000)]
    assert abs(sum(flags) / 4000 - 0.2) < 0.03
    assert not any(is_heldout(f"p{i}", 0.0) for i in range(50))


def test_buffered_updates_keep_no_view_and_reject_nan():
    prompts = _pairs(n_prompts=4, seed=10)
    s = PairSums(12)
    x, y = (torch.from_numpy(a.copy()) for a in prompts[0])
    s.update(x, y)
    ref = _sums(prompts[:1])
    x.mul_(100.0)  # the caller reuses its buffer: the sums must not change
    s.flush()
    assert torch.equal(s.cxx, ref.cxx) and torch.equal(s.mean_x, ref.mean_x)
    bad = torch.from_numpy(prompts[1][0].copy())
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        s.update(bad, torch.from_numpy(prompts[1][1]))
    assert s.flush().count == ref.count


def test_lowrank_randomized_subspace_matches_svd_reference():
    from zdf_testkit.profiles import qwen_like_profile

    d, r = 96, 4
    mu, sig = qwen_like_profile(d)
    g = np.random.default_rng(11)
    u0, v0 = g.standard_normal((d, r)), g.standard_normal((d, r)) * 0.2
    s = PairSums(d)
    xs, ys = [], []
    for _ in range(30):
        z = g.standard_normal((50, d))
        x, y = mu + sig * z, mu + sig * (z + z @ v0 @ u0.T + 0.01 * g.standard_normal((50, d)))
        s.update(torch.from_numpy(x), torch.from_numpy(y))
        xs.append(x)
        ys.append(y)
    fit = fit_adapters(s, None, mu, sig, alphas=(0.0,), ranks=(r,))["adapter_lowrank"]
    x, y = np.concatenate(xs), np.concatenate(ys)
    xw, yw = (x - mu) / sig, (y - mu) / sig
    xc, rc = xw - xw.mean(0), (yw - yw.mean(0)) - (xw - xw.mean(0))
    full = np.linalg.lstsq(xc, rc, rcond=None)[0]
    vr = np.linalg.svd(xc @ full, full_matrices=False)[2][:r].T
    ref = (sig[:, None] * (vr @ vr.T @ full.T)) / sig[None, :]
    got = (fit.u.double() @ fit.v.double().T).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_adapter_tensors_round_trip_through_a_fix_table(tmp_path):
    from dimfix.fixtable import FixTable, load_fix_table, save_fix_table

    prompts = _pairs(n_prompts=40, seed=12)
    fits = fit_adapters(_sums(prompts[:30]), _sums(prompts[30:]), MU, SIG, ranks=(2, 4))
    extras = {**fits["adapter"].tensors("adapter"), **fits["adapter_lowrank"].tensors("adapter_lowrank")}
    assert set(extras) == {"adapter_weight", "adapter_bias", "adapter_lowrank_u", "adapter_lowrank_v",
                           "adapter_lowrank_mean", "adapter_lowrank_shift"}
    f32 = lambda a: torch.from_numpy(a).float()  # noqa: E731
    table = FixTable(f32(MU), f32(SIG), f32(MU), f32(SIG), extras=extras)
    back = load_fix_table(save_fix_table(table, tmp_path / "t.safetensors"))
    for name, t in extras.items():
        assert torch.equal(back.extras[name], t), name


# ---------------------------------------------------------------------------- the staged streaming fit
def _stream(train, held, dim=12, units=(MU, SIG), metric=None, weights=None, **kw):
    f = AdapterFitter(dim, *units, metric_factor=metric, **kw)
    for i, (x, y) in enumerate(train + held):
        add = f.add_train if i < len(train) else f.add_heldout
        add(torch.from_numpy(x), torch.from_numpy(y), None if weights is None else weights[i])
    return f.finish()


@pytest.mark.parametrize("with_metric", [False, True])
def test_streamed_heldout_moments_equal_the_ones_from_sums(with_metric):
    prompts = _pairs(n_prompts=40, seed=13)
    a = torch.from_numpy(np.random.default_rng(1).standard_normal((18, 12)) / SIG) if with_metric else None
    wts = [rmsnorm_weights(torch.from_numpy(y)) for _, y in prompts]
    train = _sums(prompts[:30], metric=a, weights=wts[:30])
    mu, sig = torch.from_numpy(MU), torch.from_numpy(SIG)
    basis = TrainBasis(train, mu, sig, (2, 5), (0.0, 0.1), True, consume=False)
    streamed = HeldoutMoments(basis)
    for (x, y), w in zip(prompts[30:], wts[30:]):
        for part in (slice(0, 7), slice(7, None)):  # uneven updates: the merge must not depend on grouping
            streamed.update(torch.from_numpy(x[part]), torch.from_numpy(y[part]), w[part])
    ref = HeldoutMoments.from_sums(basis, _sums(prompts[30:], metric=a, weights=wts[30:]), consume=True)
    assert streamed.count == ref.count == 250 and streamed.n == pytest.approx(ref.n, rel=1e-12)
    for name in ("quad", "zz", "rp", "k", "mx", "mr"):
        got, want = getattr(streamed, name), getattr(ref, name)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max())), name
    assert streamed.tr_rr == pytest.approx(ref.tr_rr, rel=1e-9)
    assert streamed.tr_yy == pytest.approx(ref.tr_yy, rel=1e-9)


@pytest.mark.parametrize("with_metric", [False, True])
def test_streamed_fit_equals_the_fit_from_sums(with_metric):
    prompts = _pairs(n_prompts=40, seed=14)
    a = torch.from_numpy(np.random.default_rng(2).standard_normal((18, 12)) / SIG) if with_metric else None
    wts = [rmsnorm_weights(torch.from_numpy(y)) for _, y in prompts]
    got = _stream(prompts[:30], prompts[30:], metric=a, weights=wts, ranks=(2, 5), alphas=(0.0, 1e-3, 0.1, 1.0))
    want = fit_adapters(_sums(prompts[:30], metric=a, weights=wts[:30]),
                        _sums(prompts[30:], metric=a, weights=wts[30:]), MU, SIG, ranks=(2, 5),
                        alphas=(0.0, 1e-3, 0.1, 1.0))
    for key in ("adapter", "adapter_lowrank"):
        g, w = got[key], want[key]
        assert (g.kind, g.alpha, g.rank, g.heldout_count) == (w.kind, w.alpha, w.rank, w.heldout_count)
        assert g.train_error == pytest.approx(w.train_error, rel=1e-9)
        assert g.heldout_error == pytest.approx(w.heldout_error, rel=1e-9)
        assert np.allclose(g.path, w.path, rtol=1e-9, atol=0)
        for tg, tw in zip(g.affine(), w.affine()):
            assert torch.allclose(tg, tw, rtol=1e-5, atol=1e-6 * float(tw.abs().max()))


def test_streamed_heldout_errors_equal_explicit_for_every_mode():
    prompts = _pairs(n_prompts=40, seed=15)
    fits = _stream(prompts[:30], prompts[30:], ranks=(2, 5))
    xh, yh = _stack(prompts[30:])
    white = lambda v: (v - MU) / SIG  # noqa: E731
    spread = ((white(yh) - white(yh).mean(0)) ** 2).sum()
    assert fits["adapter"].kind == "full" and fits["adapter_lowrank"].kind == "lowrank"
    for fit in fits.values():
        w, b = (t.double().numpy() for t in fit.affine())
        err = ((white(xh @ w.T + b) - white(yh)) ** 2).sum() / spread
        assert fit.heldout_error == pytest.approx(err, rel=1e-5)
    assert fits["adapter"].heldout_error == min(e for _, e in fits["adapter"].path)


def test_fitter_units_default_to_the_training_reference_tokens():
    prompts = _pairs(n_prompts=40, seed=16)
    got = _stream(prompts[:30], prompts[30:], units=(None, None))["adapter"]
    tr = _sums(prompts[:30])
    want = fit_adapters(tr, _sums(prompts[30:]), tr.mean_y, (tr.dyy / tr.n).sqrt())["adapter"]
    assert got.alpha == want.alpha and got.heldout_error == pytest.approx(want.heldout_error, rel=1e-9)
    with pytest.raises(ValueError, match="both ref_mean and ref_std"):
        AdapterFitter(12, MU, None)


def test_fitter_refuses_training_pairs_after_heldout_ones_and_a_second_finish():
    prompts = _pairs(n_prompts=4, seed=17)
    f = AdapterFitter(12, MU, SIG)
    x, y = (torch.from_numpy(t) for t in prompts[0])
    f.add_train(x, y)
    f.add_heldout(x[:0], y[:0])  # no rows: the training stage stays open
    f.add_train(x, y)
    f.add_heldout(x, y)
    with pytest.raises(ValueError, match="study_order"):
        f.add_train(x, y)
    with pytest.raises(ValueError, match="NaN"):
        f.add_heldout(x * float("nan"), y)
    fits = f.finish()
    assert fits["adapter"].train_count == 50 and fits["adapter"].heldout_count == 25
    for call in (f.finish, lambda: f.add_heldout(x, y)):
        with pytest.raises(ValueError, match="already called"):
            call()


def test_fitter_fallbacks():
    one = AdapterFitter(12, MU, SIG)
    one.add_train(torch.from_numpy(MU[None]), torch.from_numpy(MU[None]))
    one.add_heldout(torch.from_numpy(MU[None]), torch.from_numpy(MU[None]))
    assert one.finish()["adapter"].kind == "identity"
    alone = _stream(_pairs(n_prompts=30, seed=20), [])["adapter"]  # no held-out pair at all
    assert alone.kind == "full" and alone.heldout_count == 0 and alone.alpha == 1e-2
    assert np.isnan(alone.heldout_error) and np.isfinite(alone.train_error)
    few = _stream(_pairs(n_prompts=2, per=4, seed=18), _pairs(n_prompts=2, per=4, seed=19))
    assert few["adapter"].kind == "lowrank" and any("underdetermined" in n for n in few["adapter"].notes)
    assert few["adapter"].heldout_count == 8 and np.isfinite(few["adapter"].heldout_error)
