import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dimfix.perclass import ClassCorrection, PrefixStats, apply_classwise, class_corrections, moment_match
from dimfix.perclass import ClassedStats
from dimfix.stats import DimStats
from dimfix.tokens import TokenClass, classify_positions
from zdf_testkit.profiles import qwen_like_profile

D = 32


def _layout(seed=0, n_prompts=40, defective_sink=True):
    """Z-Image-like sequences: constant prefix (sink + 2 template), content, 5 template suffix tokens."""
    g = np.random.default_rng(seed)
    mean, sigma = qwen_like_profile(D)
    sink_ref = mean + 8 * sigma
    pre_ref = [mean + sigma * g.standard_normal(D) for _ in range(2)]
    suf_ref = [mean + sigma * g.standard_normal(D) for _ in range(5)]
    sink_tgt = sink_ref * (1.7 if defective_sink else 1.0)
    scale_t, shift_t = 1 + 0.5 * g.random(D), 2 * g.standard_normal(D)
    scale_t[7] = 1e-6  # dead in the target
    seqs = []
    for _ in range(n_prompts):
        k = int(g.integers(5, 20))
        content = mean + sigma * g.standard_normal((k, D))
        suf = np.stack(suf_ref) + 0.5 * sigma * g.standard_normal((5, D))
        y = np.vstack([sink_ref, *pre_ref, content, suf])
        x = y * scale_t + shift_t
        x[0] = sink_tgt
        x[1:3] = np.stack(pre_ref) * 0.9
        seqs.append((torch.from_numpy(x), torch.from_numpy(y)))
    return seqs


def _stats(seqs):
    ref, tgt, pre = ClassedStats(D, 0), ClassedStats(D, 0), PrefixStats(D)
    for x, y in seqs:
        lab = classify_positions(x.shape[0])
        ref.update(y, lab)
        tgt.update(x, lab)
        pre.update(y)
    return ref, tgt, pre


def test_moment_match_equals_numpy_and_dead_dims_go_to_reference_mean():
    g = np.random.default_rng(1)
    y = 5 + 3 * g.standard_normal((500, 6))
    x = -2 + 0.5 * g.standard_normal((500, 6))
    x[:, 4] = 1.234
    rs, ts = DimStats(6, 0), DimStats(6, 0)
    rs.update(torch.from_numpy(y))
    ts.update(torch.from_numpy(x))
    scale, shift = moment_match(rs, ts)
    out = x * scale.double().numpy() + shift.double().numpy()
    np.testing.assert_allclose(out.mean(0), y.mean(0), rtol=1e-5)
    live = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(out.std(0, ddof=1)[live], y.std(0, ddof=1)[live], rtol=1e-5)
    assert float(scale[4]) == 0.0 and float(shift[4]) == pytest.approx(y[:, 4].mean(), rel=1e-6)


def test_class_corrections_restore_each_class_and_the_prefix():
    seqs = _layout()
    ref, tgt, pre = _stats(seqs)
    corr = class_corrections(ref, tgt, pre)
    assert corr.prefix is not None and corr.prefix.shape == (3, D)
    assert torch.allclose(corr.prefix.double(), seqs[0][1][:3], rtol=1e-6)
    fixed = ClassedStats(D, 0)
    for x, y in seqs:
        before = x.clone()
        out = corr.apply(x)
        assert torch.equal(x, before) and out.dtype == x.dtype
        assert torch.allclose(out[:3], y[:3].to(out.dtype), rtol=1e-5, atol=1e-3)  # prefix restored exactly
        # class moments: the per-class map alone (the prefix replacement overrides positions 0..2)
        fixed.update(apply_classwise(x, corr.scale, corr.shift), classify_positions(x.shape[0]))
    for c in (TokenClass.TEMPLATE, TokenClass.CONTENT):
        f, r = fixed.by_class[c], ref.by_class[c]
        assert torch.allclose(f.mean, r.mean, rtol=1e-4, atol=1e-3 * float(r.std().median()))
        live = torch.ones(D, dtype=torch.bool)
        live[7] = c != TokenClass.CONTENT  # dim 7 is dead in the target's content tokens only
        assert torch.allclose(f.std()[live], r.std()[live], rtol=1e-4)
    f, r = fixed.by_class[TokenClass.CONTENT], ref.by_class[TokenClass.CONTENT]
    assert float(f.std()[7]) < 1e-3 * float(r.std()[7])  # the target-dead dim sits at the reference mean
    # without prefix vectors the sink is still moment-matched per class: constant → reference mean
    no_pre = apply_classwise(seqs[0][0], corr.scale, corr.shift)
    assert torch.allclose(no_pre[0].double(), seqs[0][1][0], rtol=1e-5)


def test_intact_sink_stays_intact():
    seqs = _layout(defective_sink=False)
    ref, tgt, _ = _stats(seqs)
    corr = class_corrections(ref, tgt)
    out = corr.apply(seqs[0][0].float())
    assert torch.allclose(out[0].double(), seqs[0][0][0], rtol=1e-6)


def test_varying_prefix_is_not_stored_and_tensors_round_trip(tmp_path):
    seqs = _layout()
    ref, tgt, pre = _stats(seqs)
    noisy = PrefixStats(D)
    for _, y in seqs:
        noisy.update(y + 0.5 * torch.randn_like(y))
    corr = class_corrections(ref, tgt, noisy)
    assert corr.prefix is None and "not stored" in corr.notes[0]
    full = class_corrections(ref, tgt, pre)
    path = tmp_path / "t.safetensors"
    save_file(full.tensors(), str(path))
    back = ClassCorrection.from_tensors(load_file(str(path)))
    for a, b in zip((full.scale, full.shift, full.prefix), (back.scale, back.shift, back.prefix)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="class_scale"):
        ClassCorrection.from_tensors({"class_scale": torch.ones(2, D), "class_shift": torch.ones(2, D)})


def test_classes_with_too_few_tokens_are_left_unchanged():
    ref, tgt = ClassedStats(D, 0), ClassedStats(D, 0)
    x = torch.randn(6, D, dtype=torch.float64)
    lab = classify_positions(6)
    ref.update(x, lab)
    tgt.update(2 * x, lab)
    corr = class_corrections(ref, tgt)
    assert torch.equal(corr.scale[int(TokenClass.SINK)], torch.ones(D))
    assert any("sink" in n for n in corr.notes)
