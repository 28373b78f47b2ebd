
import numpy as np
import pytest
import torch

from dimfix import dit
from dimfix.analysis import CorpusAnalysis, analyze_conditioning_pairs
from dimfix.compare import compare
from dimfix.config import Thresholds
from dimfix.fixtable import load_fix_table, save_fix_table
from dimfix.stats import DimStats
from dimfix.tokens import (ENDOFTEXT, TEMPLATE_PREFIX_IDS, TEMPLATE_SUFFIX_IDS, TokenClass, classify_ids,
                           classify_positions, scope_mask)

D = 16


def per_token_cosine(a, b, mask=None):
    """Independent numpy reference: cosine of aligned tokens a[i], b[i] (i < min(T, T2)), masked."""
    n = min(a.shape[0], b.shape[0])
    x, y = a[:n].double().numpy(), b[:n].double().numpy()
    if mask is not None:
        x, y = x[mask[:n].numpy()], y[mask[:n].numpy()]
    return torch.from_numpy((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))


def outlier_flags(a, b):
    flags = torch.zeros(a.dim, dtype=torch.bool)
    flags[compare(a, b).outliers] = True
    return flags


def _prompt(gen, n_content, layers=1, dim=D, sink=1e4):
    """Synthetic [L, T, D] hidden states with the Z-Image template layout (sink at position 0)."""
    t = len(TEMPLATE_PREFIX_IDS) + n_content + len(TEMPLATE_SUFFIX_IDS)
    x = torch.randn(layers, t, dim, generator=gen, dtype=torch.float64)
    x[:, 0, 4] = sink  # massive activation on the sink token
    x[:, 1:3] *= 3.0  # template tokens: a different scale
    return x, classify_positions(t)


def _corpus(n_prompts=6, layers=1, seed=0, dim=D, scale_dims=(), once_dims=(), factor=10.0, content=12):
    """(ref, tgt, labels) per prompt; ``scale_dims`` scaled by ``factor`` in every prompt, ``once_dims`` in prompt 1."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in range(n_prompts):
        ref, lab = _prompt(gen, content + (p % 3), layers, dim)
        tgt = ref * 1.0 + 0.05 * torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        for d in scale_dims:
            tgt[..., d] *= factor
        if p == 1:
            for d in once_dims:
                tgt[..., d] *= factor
        out.append((ref, tgt, lab))
    return out


def _run(corpus, layers=None, **kw):
    an = CorpusAnalysis(D if "dim" not in kw else kw.pop("dim"), layers=layers, **kw)
    for i, (ref, tgt, lab) in enumerate(corpus):
        if layers is None:
            ref, tgt = ref[0], tgt[0]
        an.add_prompt(ref, tgt, lab, lab, prompt=f"prompt {i}")
    return an


def _content_concat(corpus, side, layer=0, scope="content"):
    idx = 0 if side == "ref" else 1
    return torch.cat([c[idx][layer][scope_mask(c[2], scope)] for c in corpus])


def test_table_equals_direct_dimstats_on_concatenated_content_tokens(tmp_path):
    corpus = _corpus(n_prompts=7, scale_dims=(3,))
    res = _run(corpus).finish(reference_model="ref-model", target_model="tgt-model")
    table = res.fix_table()
    for side, mean, std in (("ref", table.reference_mean, table.reference_std),
                            ("tgt", table.target_mean, table.target_std)):
        cat = _content_concat(corpus, side)
        direct = DimStats(D)
        direct.update(cat)
        m, s = direct.float32()
        assert torch.equal(mean, m) and torch.equal(std, s)
        # independent reference: numpy on the same tokens
        np.testing.assert_allclose(std.double().numpy(), cat.numpy().std(0, ddof=1), rtol=1e-6)
        name = "reference" if side == "ref" else "target"
        for q, key in ((0.1, "p0_1"), (1.0, "p1"), (50.0, "p50"), (99.0, "p99"), (99.9, "p99_9")):
            expected = torch.from_numpy(np.percentile(cat.numpy(), q, axis=0)).float()
            assert torch.equal(table.extras[f"{name}_{key}"], expected)
    assert table.meta.layer == -2 and table.meta.token_scope == "content"
    assert table.meta.prompt_count == 7 and table.meta.token_count == _content_concat(corpus, "ref").shape[0]
    assert table.meta.reference_model == "ref-model" and table.meta.target_model == "tgt-model"
    path = save_fix_table(table, tmp_path / "t.safetensors")
    back = load_fix_table(path)
    assert torch.equal(back.target_std, table.target_std)
    assert back.meta.thresholds == Thresholds()


def test_scope_all_and_no_sink_tables_cover_those_tokens():
    corpus = _corpus(n_prompts=4)
    for scope in ("all", "no_sink"):
        table = _run(corpus, token_scope=scope).finish().fix_table()
        direct = DimStats(D)
        direct.update(_content_concat(corpus, "ref", scope=scope))
        assert torch.equal(table.reference_std, direct.float32()[1])
        assert table.meta.token_scope == scope


def test_consistency_split_consistent_vs_prompt_specific():
    corpus = _corpus(n_prompts=5, scale_dims=(3,), once_dims=(7,))
    res = _run(corpus).finish()
    lr = res.result()
    assert lr.consistent == [3]
    assert lr.prompt_specific == [7]
    assert lr.flag_prompts == 5
    assert float(lr.frequency[3]) == 1.0 and float(lr.frequency[7]) == pytest.approx(0.2)
    assert 3 in lr.comparison.outlier_high
    # per-prompt flags agree with dimfix.compare.outlier_flags on each prompt's own stats
    for ref, tgt, lab in corpus:
        m = scope_mask(lab, "content")
        a, b = DimStats(D), DimStats(D)
        a.update(ref[0][m])
        b.update(tgt[0][m])
        flags = outlier_flags(a, b)
        assert bool(flags[3]) and flags.sum() >= 1


def assert_same_comparison(got, one):
    """Two LayerResults of the same pair agree (a sweep's layer vs a single-layer run)."""
    for name in ("sigma_ref", "sigma_tgt", "mean_ref", "mean_tgt", "ratio"):
        torch.testing.assert_close(getattr(got.comparison, name), getattr(one.comparison, name), rtol=1e-12, atol=0)
    assert got.comparison.outliers == one.comparison.outliers
    assert (got.consistent, got.prompt_specific) == (one.consistent, one.prompt_specific)
    assert got.cosine == pytest.approx(one.cosine, rel=1e-12)


def test_per_prompt_flags_follow_the_compare_ratio_rule():
    from dimfix.analysis import _ratio_flags, _std_tokens
    from dimfix.rules import std_ratio

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 9, 40, generator=gen, dtype=torch.float64) * torch.rand(40, generator=gen, dtype=torch.float64)
    s = _std_tokens(x.float())
    for j in range(3):
        direct = DimStats(40)
        direct.update(x[j].float())
        torch.testing.assert_close(s[j], direct.std(), rtol=1e-12, atol=0)
    s_ref = torch.rand(2, 41, generator=gen, dtype=torch.float64) + 0.1
    s_tgt = s_ref * torch.tensor([3.0001, 2.9999, 1 / 3.0001, 1 / 2.9999, 1.0] * 8 + [50.0], dtype=torch.float64)
    s_ref[1, 7] = 0.0  # a zero reference σ: finite ratio through the relative epsilon
    flags = _ratio_flags(s_ref, s_tgt, Thresholds())
    for j in range(2):
        r = std_ratio(s_tgt[j], s_ref[j])
        assert torch.equal(flags[j], (r > 3.0) | (r < 1 / 3.0))
    assert flags[0, :5].tolist() == [True, False, True, False, False]


def test_sweep_equals_per_layer_single_runs():
    corpus = _corpus(n_prompts=5, layers=3, scale_dims=(2,), once_dims=(9,), seed=4)
    sweep = _run(corpus, layers=[-3, -2, -1], primary_layers=[-2]).finish()
    assert sweep.layers == [-3, -2, -1] and sweep.report_layer == -2 and sweep.is_sweep
    for j, k in enumerate([-3, -2, -1]):
        single = CorpusAnalysis(D, layers=[k])
        for ref, tgt, lab in corpus:
            single.add_prompt(ref[j], tgt[j], lab, lab)
        one = single.finish().result(k)
        got = sweep.result(k)
        assert_same_comparison(got, one)
        for name, (n, mean) in got.reference_classes.items():
            assert n == one.reference_classes[name][0]
            torch.testing.assert_close(mean, one.reference_classes[name][1], rtol=1e-12, atol=1e-12, equal_nan=True)
        st = sweep.fix_table(k)
        assert st.meta.layer == k
        assert ("reference_p50" in st.extras) == (k == -2)  # percentiles only for the primary layer
    assert torch.equal(sweep.fix_table().target_std, sweep.fix_table(-2).target_std)


def test_sweep_cross_layer_and_recommended_layer():
    gen = torch.Generator().manual_seed(1)
    an = CorpusAnalysis(D, layers=[0, 1, 2], primary_layers=[1])
    for _ in range(4):
        ref, lab = _prompt(gen, 12, layers=3)
        tgt = ref.clone()
        tgt[0, :, :5] *= 10  # target layer 0: 5 dims off
        tgt[1, :, :2] *= 10  # target layer 1: 2 dims off
        tgt[2] = ref[1]  # target layer 2 reproduces the reference's layer 1 exactly
        an.add_prompt(ref, tgt, lab, lab)
    res = an.finish()
    rows = {r["layer"]: r for r in res.cross_layer()}
    assert rows[2]["outliers"] == 0 and rows[2]["std_pearson"] == pytest.approx(1.0)
    assert rows[1]["outliers"] == 2
    assert res.recommended_layer() == 2
    md = res.report_markdown()
    assert "## Layer sweep" in md and "**Recommended target layer: 2**" in md


def test_report_contains_verdict_rows_and_top_dims():
    corpus = _corpus(n_prompts=6, scale_dims=(3, 11), once_dims=(7,))
    res = _run(corpus).finish(reference_model="Qwen3-4B", target_model="Qwen3-Embedding-4B")
    md = res.report_markdown()
    lr = res.result()
    v = {r.name: r for r in lr.verdict.rows}
    assert v["outlier dims"].value == len(lr.comparison.outliers)
    assert v["std correlation"].value == lr.comparison.std_pearson
    assert v["mean correlation"].value == lr.comparison.mean_pearson
    for line in (f"| cosine | {v['cosine'].value:.4f} | > 0.95 |",
                 f"| std correlation | {lr.comparison.std_pearson:.4f} | > 0.95 |",
                 f"| mean correlation | {lr.comparison.mean_pearson:.4f} | > 0.9 |",
                 f"| outlier dims | {len(lr.comparison.outliers)} | < 10 |"):
        assert line in md
    assert "Qwen3-Embedding-4B vs Qwen3-4B" in md
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| 3 |") or ln.startswith("| 11 |")]
    assert len(table_rows) == 2
    for ln, d in zip(table_rows, (3, 11)):
        ratio = float(lr.comparison.ratio[d])
        assert 9 < ratio < 11 and f"| {ratio:.4g} |" in ln  # the ≈10× dims with their ratio
    assert "- Consistent (2): 3, 11" in md and "- Prompt-specific (1): 7" in md
    assert "**sink**" in md and "4 (+1e+04)" in md  # the sink's massive dim
    assert "## DiT-aware" not in md and "## Layer sweep" not in md


def test_verdict_cosine_is_mean_of_aligned_content_token_cosines():
    corpus = _corpus(n_prompts=4, scale_dims=(5,))
    lr = _run(corpus).finish().result()
    cos = torch.cat([per_token_cosine(r[0], t[0], scope_mask(lab, "content")) for r, t, lab in corpus])
    assert lr.cosine_tokens == cos.numel()
    assert lr.cosine == pytest.approx(float(cos.double().mean()), abs=1e-6)


def test_alignment_with_ids_and_appended_eos():
    """Target = Qwen3-Embedding style: one extra <|endoftext|> at the end; ids decide what is compared."""
    gen = torch.Generator().manual_seed(2)
    ids = list(TEMPLATE_PREFIX_IDS) + [100, 200, 300, 400] + list(TEMPLATE_SUFFIX_IDS)
    ref = torch.randn(len(ids), D, generator=gen, dtype=torch.float64)
    tgt = torch.cat([ref * 2.0 + 0.1 * torch.randn(ref.shape, generator=gen, dtype=torch.float64),
                     torch.randn(1, D, generator=gen, dtype=torch.float64)])
    t_ids = ids + [ENDOFTEXT]
    r_lab, t_lab = classify_ids(ids), classify_ids(t_ids)
    assert int(t_lab[-1]) == int(TokenClass.APPENDED_EOS)
    an = CorpusAnalysis(D)
    an.add_prompt(ref, tgt, r_lab, t_lab, ref_ids=ids, tgt_ids=t_ids)
    # a prompt whose 2nd content token differs: that position is left out
    ids2 = list(ids)
    ids2[4] = 999
    an.add_prompt(ref, tgt[:-1], r_lab, classify_ids(ids2), ref_ids=ids, tgt_ids=ids2)
    # without ids and with different lengths (ignoring the EOS): no cosine, noted
    an.add_prompt(ref, tgt[:-2], r_lab, classify_positions(len(ids) - 1), prompt="short")
    res = an.finish()
    m = scope_mask(r_lab, "content")
    c1 = per_token_cosine(ref, tgt, m).double()
    m2 = m.clone()
    m2[4] = False
    c2 = per_token_cosine(ref, tgt[:-1], m2).double()
    lr = res.result()
    assert lr.cosine_tokens == c1.numel() + c2.numel() == 7
    assert lr.cosine == pytest.approx(float(torch.cat([c1, c2]).mean()), abs=1e-6)
    assert any("'short'" in w and "no per-token cosine" in w for w in res.warnings)
    assert res.class_counts["target"]["appended_eos"] == 1
    assert res.class_counts["reference"]["appended_eos"] == 0


def test_single_token_and_all_template_prompts_are_handled():
    corpus = _corpus(n_prompts=4)
    an = _run(corpus)
    gen = torch.Generator().manual_seed(9)
    one = torch.randn(1, D, generator=gen, dtype=torch.float64)
    an.add_prompt(one, one * 2, classify_positions(1), classify_positions(1), prompt="T=1")
    empty = torch.randn(8, D, generator=gen, dtype=torch.float64)  # empty prompt: template only
    lab = classify_positions(8)
    assert int((lab == int(TokenClass.CONTENT)).sum()) == 0
    an.add_prompt(empty, empty, lab, lab, prompt="empty")
    res = an.finish()
    base = _run(corpus).finish()
    assert res.prompt_count == 6 and res.result().flag_prompts == 4
    assert torch.equal(res.fix_table().reference_std, base.fix_table().reference_std)
    assert res.class_counts["reference"]["sink"] == base.class_counts["reference"]["sink"] + 2
    assert res.class_counts["reference"]["template"] == base.class_counts["reference"]["template"] + 7
    assert sum("fewer than 2 'content' tokens" in w for w in res.warnings) == 2
    # a corpus of only such prompts: a clear error, not a NaN table
    lonely = CorpusAnalysis(D)
    lonely.add_prompt(empty, empty, lab, lab)
    with pytest.raises(ValueError, match=r"only 0 token\(s\) in the 'content' scope.*'no_sink' or 'all'"):
        lonely.finish()
    with pytest.raises(ValueError, match="no prompts"):
        CorpusAnalysis(D).finish()


def test_nan_input_refused_with_count_and_nothing_recorded():
    corpus = _corpus(n_prompts=2)
    an = _run(corpus)
    ref, tgt, lab = corpus[0]
    bad = tgt[0].clone()
    bad[2, 3] = float("nan")
    bad[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"tgt_hidden of prompt #2 contains 2 NaN/Inf"):
        an.add_prompt(ref[0], bad, lab, lab)
    assert an.prompt_count == 2
    assert torch.equal(an.finish().fix_table().target_std, _run(corpus).finish().fix_table().target_std)


def test_bad_shapes_and_labels_are_refused():
    an = CorpusAnalysis(D, layers=[0, 1])
    x = torch.zeros(2, 5, D)
    lab = classify_positions(5)
    with pytest.raises(ValueError, match=r"\[2, T, 16\]"):
        an.add_prompt(x[0], x, lab, lab)
    with pytest.raises(ValueError, match="ref_labels must be an int64 tensor"):
        an.add_prompt(x, x, lab[:4], lab)
    with pytest.raises(ValueError, match="unknown token classes"):
        an.add_prompt(x, x, lab + 7, lab)
    with pytest.raises(ValueError, match="scope"):
        CorpusAnalysis(D, token_scope="content_only")
    with pytest.raises(ValueError, match="primary_layers"):
        CorpusAnalysis(D, layers=[0, 1], primary_layers=[5])


def test_bf16_input_is_upcast_and_not_modified():
    corpus = _corpus(n_prompts=3)
    an = CorpusAnalysis(D)
    for ref, tgt, lab in corpus:
        r16 = ref[0].to(torch.bfloat16)
        before = r16.clone()
        an.add_prompt(r16, tgt[0].float(), lab, lab)
        assert torch.equal(r16, before)
    table = an.finish().fix_table()
    direct = DimStats(D)
    direct.update(torch.cat([ref[0].to(torch.bfloat16)[scope_mask(lab, "content")] for ref, _, lab in corpus]))
    assert torch.equal(table.reference_std, direct.float32()[1])


def test_fixed_seed_determinism():
    corpus = _corpus(n_prompts=6, layers=2, scale_dims=(1,), once_dims=(6,), seed=7)
    a = _run(corpus, layers=[0, 1], primary_layers=[1], sample_rows=16, seed=3).finish()
    b = _run(corpus, layers=[0, 1], primary_layers=[1], sample_rows=16, seed=3).finish()
    ta, tb = a.fix_table(), b.fix_table()
    for name, t in ta.tensors().items():
        assert torch.equal(t, tb.tensors()[name]), name
    assert a.report_markdown() == b.report_markdown()


def _cap_weights(dim=D, out=8, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(dim, generator=gen) + 0.5, torch.randn(out, dim, generator=gen), torch.randn(out, generator=gen))


def test_dit_aware_ranking_and_caption_space_cosine():
    corpus = _corpus(n_prompts=4, scale_dims=(3,), once_dims=(7,))
    gain, weight, bias = _cap_weights()
    an = CorpusAnalysis(D)
    an.set_dit(gain, weight, bias, eps=1e-5)
    for ref, tgt, lab in corpus:
        an.add_prompt(ref[0], tgt[0], lab, lab)
    res = an.finish()
    lr = res.result()
    assert torch.equal(lr.sensitivity, dit.cap_sensitivity(gain, weight))
    sens = dit.cap_sensitivity(gain, weight, sigma_ref=lr.comparison.sigma_ref)
    assert torch.equal(lr.influence, sens)
    expected_rank = dit.rank_dims(sens, lr.comparison.log_ratio, top=20)
    assert [(r["dim"], r["score"]) for r in lr.dit_ranking] == [(r["dim"], r["score"]) for r in expected_rank]
    # by hand: s_d = |g_d| ||W[:, d]||; the top dim maximises s_d σ_ref,d |ln r_d|
    s_hand = gain.double().abs() * weight.double().norm(dim=0)
    torch.testing.assert_close(lr.sensitivity.double(), s_hand, rtol=1e-6, atol=0)
    score = s_hand * lr.comparison.sigma_ref.double() * lr.comparison.log_ratio.double().abs()
    assert lr.dit_ranking[0]["dim"] == int(torch.argmax(score))
    top = lr.dit_ranking[0]
    assert top["sensitivity"] == pytest.approx(float(s_hand[top["dim"]]), rel=1e-6)
    assert top["sigma_ref"] == float(lr.comparison.sigma_ref[top["dim"]])
    assert top["influence"] == pytest.approx(top["sensitivity"] * top["sigma_ref"], rel=1e-6)
    cos = []
    for ref, tgt, lab in corpus:
        m = scope_mask(lab, "content")
        f = [torch.nn.functional.linear(torch.nn.functional.rms_norm(x[0][m].double(), (D,), gain.double(), 1e-5),
                                        weight.double(), bias.double()) for x in (ref, tgt)]
        cos.append(torch.nn.functional.cosine_similarity(f[0], f[1], dim=-1))
    assert lr.caption_cosine == pytest.approx(float(torch.cat(cos).mean()), abs=1e-6)
    md = res.report_markdown()
    assert "## DiT-aware view" in md and f"| {expected_rank[0]['dim']} |" in md
    with pytest.raises(ValueError, match="takes 8-dim caption features"):
        CorpusAnalysis(8 + 1).set_dit(torch.ones(8), torch.ones(4, 8))


def test_min_tokens_warning():
    corpus = _corpus(n_prompts=2, content=5)
    res = _run(corpus).finish()
    assert any("fewer than 32" in w for w in res.warnings)
    res2 = _run(corpus, thresholds=Thresholds(min_tokens=4)).finish()
    assert not any("fewer than" in w for w in res2.warnings)


def test_plots_are_rgb_images_and_sweep_adds_heatmap():
    corpus = _corpus(n_prompts=3, layers=2, scale_dims=(3,))
    single = _run(corpus[:], layers=[0, 1], primary_layers=[1]).finish()
    images = single.plots()
    assert len(images) == 6
    for img in images:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.std() > 0  # not blank


def test_realistic_profile_massive_dims_and_two_sided_outliers(reference_stats_npz):
    """Tokens drawn with the real Qwen3-4B layer -2 per-dim μ/σ (massive dims 4, 396, 0, 100): a target whose
    dim 396 has ~600× less variance (the VL case the original one-sided test missed) and dim 7 5× more."""
    ref_stats = np.load(reference_stats_npz)
    mu = torch.from_numpy(ref_stats["per_dim_mean"]).double()
    sigma = torch.from_numpy(ref_stats["per_dim_std"]).double()
    dim = mu.numel()
    gen = torch.Generator().manual_seed(5)
    scale = torch.ones(dim, dtype=torch.float64)
    scale[396], scale[7] = 1 / 600, 5.0
    an = CorpusAnalysis(dim)
    for p in range(6):
        lab = classify_positions(3 + 20 + 5)
        z = torch.randn(lab.numel(), dim, generator=gen, dtype=torch.float64)
        ref = (mu + z * sigma).float()
        tgt = (mu + z * sigma * scale).float()
        an.add_prompt(ref, tgt, lab, lab)
    lr = an.finish().result()
    assert lr.comparison.outlier_low == [396] and lr.comparison.outlier_high == [7]
    assert lr.consistent == [7, 396] and lr.prompt_specific == []
    assert {4, 396}.issubset(lr.comparison.hyper_ref)
    assert lr.verdict.rows[3].passed  # 2 outlier dims < 10


# ---------------------------------------------------------------------------- reference layer != target layer
HF7 = [-7, -6, -5, -4, -3, -2, -1]  # HF indices of a 6-block encoder, stacked on axis 0 in this order


def _layered_corpus(n_prompts=5, seed=11):
    """[7, T, D] per prompt; each layer its own scale so pairing the wrong layers cannot go unnoticed."""
    corpus = _corpus(n_prompts=n_prompts, layers=len(HF7), scale_dims=(2,), once_dims=(9,), seed=seed)
    scale = torch.arange(1, len(HF7) + 1, dtype=torch.float64).view(-1, 1, 1)
    return [(ref * scale, tgt * scale.flip(0), lab) for ref, tgt, lab in corpus]


def _pair_run(corpus, ref_layer, tgt_layers, **kw):
    """Reference fed at ``ref_layer`` only ([T, D]), target at ``tgt_layers`` ([L, T, D])."""
    an = CorpusAnalysis(D, layers=tgt_layers, reference_layer=ref_layer, **kw)
    for i, (ref, tgt, lab) in enumerate(corpus):
        an.add_prompt(ref[HF7.index(ref_layer)], tgt[[HF7.index(k) for k in tgt_layers]], lab, lab, prompt=f"p{i}")
    return an


def test_reference_layer_pair_equals_direct_statistics_of_each_layer(tmp_path):
    """Reference -2 paired with target -6: exactly the reference's layer -2 and the target's layer -6 statistics
    (as a same-layer analysis of each layer computes them, and as numpy computes them)."""
    corpus = _layered_corpus()
    res = _pair_run(corpus, -2, [-6]).finish(reference_model="qwen3-4b", target_model="qwen3-vl")
    assert res.reference_layer == -2 and res.layers == [-6] and not res.is_sweep
    got = res.result()
    assert (got.layer, got.reference_layer) == (-6, -2)
    same = _run(corpus, layers=HF7).finish()
    for name in ("mean", "m2", "m3", "m4", "min", "max"):
        assert torch.equal(getattr(got.reference, name), getattr(same.result(-2).reference, name)), name
        assert torch.equal(getattr(got.target, name), getattr(same.result(-6).target, name)), name
    for name, (n, mean) in got.reference_classes.items():
        assert n == same.result(-2).reference_classes[name][0]
        torch.testing.assert_close(mean, same.result(-2).reference_classes[name][1], rtol=1e-12, atol=1e-12,
                                   equal_nan=True)
    table = res.fix_table()
    assert (table.meta.layer, table.meta.reference_layer) == (-6, -2)
    ref_cat = _content_concat(corpus, "ref", layer=HF7.index(-2))
    tgt_cat = _content_concat(corpus, "tgt", layer=HF7.index(-6))
    np.testing.assert_allclose(table.reference_std.double().numpy(), ref_cat.numpy().std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(table.target_std.double().numpy(), tgt_cat.numpy().std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(table.target_mean.double().numpy(), tgt_cat.numpy().mean(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(table.extras["reference_p99"], torch.from_numpy(np.percentile(ref_cat.numpy(), 99, 0)).float())
    # cosine of reference -2 tokens with target -6 tokens, numpy
    a, b = ref_cat.numpy(), tgt_cat.numpy()
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert got.cosine == pytest.approx(float(cos.mean()), rel=1e-9) and got.cosine_tokens == len(cos)
    # per-prompt flags: the compare ratio rule on this prompt's reference -2 and target -6 σ
    flags = []
    for r, t, lab in corpus:
        m = scope_mask(lab, "content")
        a, b = DimStats(D), DimStats(D)
        a.update(r[HF7.index(-2)][m])
        b.update(t[HF7.index(-6)][m])
        flags.append(outlier_flags(a, b))
    freq = torch.stack(flags).double().mean(0)
    torch.testing.assert_close(got.frequency.double(), freq)
    back = load_fix_table(save_fix_table(table, tmp_path / "vl.safetensors"))
    assert (back.meta.layer, back.meta.reference_layer) == (-6, -2)
    md = res.report_markdown()
    assert "reference HF `hidden_states[-2]`, target HF `hidden_states[-6]`" in md
    assert "## Verdict (target layer -6 vs reference layer -2)" in md
    # the same pair given as one reference layer equal to the target layer == the same-layer analysis
    one = _pair_run(corpus, -2, [-2]).finish()
    for name in ("sigma_ref", "sigma_tgt", "ratio"):
        assert torch.equal(getattr(one.result().comparison, name), getattr(same.result(-2).comparison, name))


def test_fixed_reference_sweep_equals_single_pair_runs():
    corpus = _layered_corpus(n_prompts=4, seed=12)
    sweep = _pair_run(corpus, -2, HF7, primary_layers=[-6]).finish()
    assert sweep.report_layer == -6 and sweep.is_sweep and sweep.reference_layer == -2
    cross = {row["layer"]: row for row in sweep.cross_layer()}
    assert cross == {row["layer"]: row for row in sweep.cross_layer(-2)}
    with pytest.raises(KeyError, match="not measured at layer -3"):
        sweep.cross_layer(-3)
    for k in HF7:
        one = _pair_run(corpus, -2, [k]).finish().result()
        got = sweep.result(k)
        assert got.reference_layer == -2
        assert_same_comparison(got, one)
        # cross_layer (what the recommendation uses) is the per-layer comparison with the fixed reference
        assert cross[k]["outliers"] == len(got.comparison.outliers)
        assert cross[k]["std_pearson"] == pytest.approx(got.comparison.std_pearson, rel=1e-12)
        t = sweep.fix_table(k)
        assert (t.meta.layer, t.meta.reference_layer) == (k, -2)
        assert ("target_p50" in t.extras) == (k == -6) and "reference_p50" in t.extras


def test_fixed_reference_sweep_recommends_the_matching_target_layer():
    gen = torch.Generator().manual_seed(3)
    an = CorpusAnalysis(D, layers=[-4, -3, -2, -1], reference_layer=-2, primary_layers=[-2])
    for _ in range(4):
        ref, lab = _prompt(gen, 12, layers=1)
        tgt = ref.repeat(4, 1, 1)
        tgt[0, :, :5] *= 10  # -4: 5 dims off
        tgt[2, :, :3] *= 10  # -2: 3 dims off
        tgt[3, :, :1] *= 10  # -1: 1 dim off; -3 reproduces the reference's layer -2
        an.add_prompt(ref[0], tgt, lab, lab)
    res = an.finish()
    assert res.recommended_layer() == -3
    assert [r["outliers"] for r in res.cross_layer()] == [5, 0, 3, 1]
    md = res.report_markdown()
    assert "Every target layer k vs the reference at layer -2" in md and "**Recommended target layer: -3**" in md
    assert "pairs the same layer (-2) of both encoders" in md and "re-run with target layer -3" in md


def test_reference_layer_shapes_and_types_are_checked():
    corpus = _layered_corpus(n_prompts=2)
    ref, tgt, lab = corpus[0]
    an = CorpusAnalysis(D, layers=[-6, -5], reference_layer=-2)
    with pytest.raises(ValueError, match=r"ref_hidden must have shape \[T, 16\] \(layer -2\)"):
        an.add_prompt(ref[:2], tgt[1:3], lab, lab)
    with pytest.raises(ValueError, match=r"tgt_hidden must have shape \[2, T, 16\]"):
        an.add_prompt(ref[5], tgt[1], lab, lab)
    an.add_prompt(ref[5].unsqueeze(0), tgt[1:3], lab, lab)  # [1, T, D] is accepted too
    assert an.prompt_count == 1
    with pytest.raises(TypeError, match="reference_layer must be an int"):
        CorpusAnalysis(D, layers=[-6], reference_layer=True)


def test_token_class_plot_counts_tokens(monkeypatch):
    from dimfix import plots

    calls = []
    original = plots.class_counts

    def spy(counts, *args, **kwargs):
        calls.append((kwargs.get("title"), kwargs.get("ylabel", "dims")))
        return np.zeros((4, 4, 3), np.uint8)

    monkeypatch.setattr(plots, "class_counts", spy)
    _run(_corpus(n_prompts=3)).finish().plots()
    assert calls == [("Dimension classes", "dims"), ("Tokens per class", "tokens")]
    assert original is not spy


def _cond(*seqs):
    """A CONDITIONING with one [1, T, D] entry per sequence (float32, all-ones mask)."""
    return [[s.float().unsqueeze(0), {"pooled_output": None, "attention_mask": torch.ones(1, s.shape[0])}]
            for s in seqs]


def test_conditioning_pairs_equal_the_prompt_by_prompt_analysis():
    corpus = _corpus(n_prompts=4, scale_dims=(3,))
    steps = []
    an = analyze_conditioning_pairs(_cond(*(r[0] for r, _, _ in corpus)), _cond(*(t[0] for _, t, _ in corpus)),
                                    layer=-6, reference_layer=-2, step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    direct = CorpusAnalysis(D, layers=[-6], reference_layer=-2)
    for r, t, lab in corpus:
        direct.add_prompt(r[0].float(), t[0].float().unsqueeze(0), lab, lab)
    got, want = an.finish().result(), direct.finish().result()
    assert (got.layer, got.reference_layer) == (-6, -2)
    for name in ("sigma_ref", "sigma_tgt", "mean_ref", "mean_tgt"):
        assert torch.equal(getattr(got.comparison, name), getattr(want.comparison, name)), name
    assert got.cosine == want.cosine and got.consistent == want.consistent == [3]


def test_conditioning_pairs_guess_an_appended_eos_and_split_batches():
    gen = torch.Generator().manual_seed(4)
    ref = torch.randn(2, 14, D, generator=gen)
    tgt = torch.cat([ref * 1.5, torch.randn(2, 1, D, generator=gen) * 50], dim=1)  # one extra trailing token
    an = analyze_conditioning_pairs([[ref, {}]], [[tgt, {}]])  # one entry, batch 2: two pairs
    res = an.finish()
    assert res.prompt_count == 2
    assert res.class_counts["target"]["appended_eos"] == 2 and res.class_counts["reference"]["appended_eos"] == 0
    assert res.result().cosine == pytest.approx(1.0, abs=1e-6)  # the EOS is left out of the aligned tokens
    same = analyze_conditioning_pairs([[ref, {}]], [[ref * 2, {}]]).finish()
    assert same.class_counts["target"]["appended_eos"] == 0


def test_conditioning_pairs_reject_unpaired_or_mixed_widths():
    a = torch.randn(1, 12, D)
    with pytest.raises(ValueError, match="Node: 'reference_conditioning' holds 1 sequences but 'target_conditioning' 2"):
        analyze_conditioning_pairs([[a, {}]], [[a, {}], [a, {}]], node="Node")
    with pytest.raises(ValueError, match=r"widths differ \(reference 16, target 24"):
        analyze_conditioning_pairs([[a, {}]], [[torch.randn(1, 12, 24), {}]])
    with pytest.raises(ValueError, match="target_conditioning"):
        analyze_conditioning_pairs([[a, {}]], [[torch.full((1, 12, D), float("nan")), {}]])
