"""The analysis' repair study end to end: a corpus → fix table with learned modes and a recommendation → the
Fix path (any mode, auto), against the closed-form least-squares map on held-out tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dimfix import fixtable, repair
from dimfix.analysis import CorpusAnalysis
from dimfix.config import Thresholds
from dimfix.dit import CapEmbedder
from dimfix.pairs import is_heldout
from dimfix.tokens import TEMPLATE_PREFIX_IDS, TEMPLATE_SUFFIX_IDS, classify_ids
from zdf_testkit.profiles import near_identity_mix, qwen_like_profile, synthetic_cap_weights

D = 48


def _corpus(mix: np.ndarray, prompts: int = 50, seed: int = 0):
    """Templated prompts: ids, reference tokens [T, D] (constant sink/prefix rows) and target = mix · reference."""
    g = np.random.default_rng(seed)
    mean, sigma = qwen_like_profile(D, seed)
    prefix = mean + sigma * g.standard_normal((len(TEMPLATE_PREFIX_IDS), D))  # the same for every prompt
    out = []
    for i in range(prompts):
        n = int(g.integers(8, 20))
        ids = [*TEMPLATE_PREFIX_IDS, *g.integers(100, 5000, n).tolist(), *TEMPLATE_SUFFIX_IDS]
        y = mean + sigma * g.standard_normal((len(ids), D))
        y[: len(prefix)] = prefix
        z = (y - mean) / sigma
        x = mean + sigma * (z @ mix.T + 0.05 * g.standard_normal(z.shape))  # a mix, plus encoder noise
        out.append((f"prompt {i}", ids, torch.tensor(y, dtype=torch.float32), torch.tensor(x, dtype=torch.float32)))
    return out, sigma


def _run(corpus, cap=None):
    an, study = CorpusAnalysis(D), repair.RepairStudy(D, cap)
    for i in repair.study_order([c[0] for c in corpus]):
        prompt, ids, y, x = corpus[i]
        labels = classify_ids(ids)
        an.add_prompt(y, x, labels, labels, prompt=prompt, ref_ids=ids, tgt_ids=ids, index=i)
        study.add_prompt(prompt, y, x, ids, ids, labels, labels)
    table = an.finish().fix_table()
    return table, study.finish(table, Thresholds())


def _heldout_error(corpus, fn, cap):
    """Held-out caption-space squared error of ``fn`` (target [T, D] → fixed)."""
    err = 0.0
    for prompt, ids, y, x in corpus:
        if is_heldout(prompt):
            err += float(((cap.features(fn(x)) - cap.features(y)) ** 2).sum())
    return err


def test_mixed_target_recommends_the_adapter_at_the_least_squares_optimum():
    corpus, sigma = _corpus(near_identity_mix(D, strength=0.6, seed=1))
    cap = CapEmbedder.from_weights(*(torch.tensor(a, dtype=torch.float32) for a in synthetic_cap_weights(sigma)))
    table, res = _run(corpus, cap)
    assert res.recommended == "adapter" and res.passed
    by_mode = {r.mode: r for r in res.results}
    assert by_mode["adapter"].caption_cosine > 0.99 > by_mode["affine"].caption_cosine
    # the seeds' four numbers cannot see the mix: they pass for the unfixed target
    assert by_mode["none"].seeds.passed and not by_mode["none"].verdict.passed
    # the closed-form least-squares map on the training tokens, judged on the same held-out tokens
    train = [(x, y) for p, _, y, x in corpus if not is_heldout(p)]
    xs = torch.cat([x for x, _ in train]).double()
    ys = torch.cat([y for _, y in train]).double()
    a = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, ys).solution
    optimum = _heldout_error(corpus, lambda x: (x.double() @ sol[:-1] + sol[-1]).float(), cap)
    extended = res.extend(table)
    fixed = repair.fix_function(extended, "auto", 1.0, Thresholds(), "content")
    got = _heldout_error(corpus, lambda x: fixed(x.unsqueeze(0))[0], cap)
    assert got <= 1.1 * optimum
    assert _heldout_error(corpus, lambda x: x, cap) > 2 * optimum  # the mix is a real defect


def test_table_round_trip_and_old_tables(tmp_path):
    corpus, _ = _corpus(near_identity_mix(D, strength=0.6, seed=2), prompts=40)
    table, res = _run(corpus)
    extended = res.extend(table)
    assert "adapter" not in table.meta.recommended_mode and set(res.tensors()) <= set(extended.extras)
    path = fixtable.save_fix_table(extended, tmp_path / "t.safetensors")
    back = fixtable.load_fix_table(path)
    assert back.meta.recommended_mode == res.recommended
    for name, t in res.tensors().items():
        assert torch.equal(back.extras[name], t), name
    x = corpus[0][3].unsqueeze(0)
    for mode in ("adapter", "adapter_lowrank", "per_class", "auto", "affine"):
        a = repair.fix_function(extended, mode, 1.0, Thresholds(), "content")(x)
        b = repair.fix_function(back, mode, 1.0, Thresholds(), "content")(x)
        assert torch.equal(a, b) and a.shape == x.shape, mode
    half = repair.fix_function(back, "adapter", 0.5, Thresholds(), "content")(x)
    full = repair.fix_function(back, "adapter", 1.0, Thresholds(), "content")(x)
    torch.testing.assert_close(half, x + 0.5 * (full - x))
    # a table from before the study: auto = affine, learned modes say what is missing
    assert repair.resolve_mode(table, "auto") == "affine"
    with pytest.raises(ValueError, match="needs the fix table tensors .*adapter_weight.*re-run the Dimension Analyzer"):
        repair.fix_function(table, "adapter", 1.0, Thresholds(), "content")


def test_no_aligned_tokens_no_recommendation():
    corpus, _ = _corpus(np.eye(D), prompts=10)
    an, study = CorpusAnalysis(D), repair.RepairStudy(D)
    for prompt, ids, y, x in corpus:
        labels = classify_ids(ids)
        an.add_prompt(y, x, labels, labels, prompt=prompt)
        study.add_prompt(prompt, y, x, None, None, labels, labels)  # ids unknown: nothing can be paired
    res = study.finish(an.finish().fix_table(), Thresholds())
    assert res.recommended == "" and not res.fits and res.counts["skipped"] == 10
    assert "no training prompt" in res.markdown()


def test_study_order_and_a_training_prompt_after_heldout_ones():
    corpus, _ = _corpus(np.eye(D), prompts=30)
    names = [c[0] for c in corpus]
    order = repair.study_order(names)
    held = [is_heldout(p) for p in names]
    assert sorted(order) == list(range(30)) and 0 < sum(held) < 30
    assert [held[i] for i in order] == sorted(held)  # training first, each side in corpus order
    assert order == sorted(order, key=lambda i: (held[i], i))
    study = repair.RepairStudy(D)
    first_held = next(i for i in range(30) if held[i])
    first_train = next(i for i in range(30) if not held[i])
    for i in (first_train, first_held):
        prompt, ids, y, x = corpus[i]
        labels = classify_ids(ids)
        study.add_prompt(prompt, y, x, ids, ids, labels, labels)
    before = dict(study.counts), study.ref_classes.scope("all").count
    prompt, ids, y, x = corpus[next(i for i in range(first_train + 1, 30) if not held[i])]
    labels = classify_ids(ids)
    with pytest.raises(ValueError, match="study_order"):
        study.add_prompt(prompt, y, x, ids, ids, labels, labels)
    assert (dict(study.counts), study.ref_classes.scope("all").count) == before  # nothing of it recorded


def test_analysis_keeps_corpus_numbers_when_fed_in_study_order():
    corpus, _ = _corpus(np.eye(D), prompts=12)
    an = CorpusAnalysis(D)
    for i in repair.study_order([c[0] for c in corpus]):
        prompt, ids, y, x = corpus[i]
        labels = classify_ids(ids)
        an.add_prompt(y, x, labels, labels, prompt=prompt, ref_ids=ids, tgt_ids=ids, index=i)
    rows = an.finish().prompt_cosines
    assert [(i, p) for i, p, _ in rows] == [(i, c[0]) for i, c in enumerate(corpus)]
