import numpy as np
import pytest
import torch

from dimfix.adapter import fit_adapters
from dimfix.dit import CapEmbedder
from dimfix.evaluate import ModeEvaluator, adapter_mode, classwise_mode, perdim_mode, results_markdown
from dimfix.pairs import PairSums
from dimfix.perclass import ClassCorrection, moment_match
from dimfix.stats import DimStats
from dimfix.tokens import TokenClass
from zdf_testkit.profiles import near_identity_mix, qwen_like_profile, synthetic_cap_weights

D = 48


def _data(seed=0, prompts=60, per=40):
    g = np.random.default_rng(seed)
    mean, sigma = qwen_like_profile(D)
    mix = near_identity_mix(D, 0.6, seed)
    out = []
    for _ in range(prompts):
        z = g.standard_normal((per, D))
        y = mean + sigma * z
        x = mean + sigma * (z @ mix.T + 0.02 * g.standard_normal((per, D)))
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out, mean, sigma


def _cap(sigma):
    return CapEmbedder.from_weights(*(torch.from_numpy(t) for t in synthetic_cap_weights(sigma, 40, seed=3)))


def test_modes_on_mixed_target_recommend_the_adapter():
    data, mean, sigma = _data()
    train, held = data[:45], data[45:]
    tr, ho = PairSums(D), PairSums(D)
    rs, ts = DimStats(D, 0), DimStats(D, 0)
    for x, y in train:
        tr.update(x, y)
        rs.update(y)
        ts.update(x)
    for x, y in held:
        ho.update(x, y)
    fits = fit_adapters(tr, ho, mean, sigma)
    scale, shift = moment_match(rs, ts)
    modes = {"none": perdim_mode(torch.ones(D), torch.zeros(D)), "moments": perdim_mode(scale, shift),
             "adapter": adapter_mode(fits["adapter"]), "adapter_lowrank": adapter_mode(fits["adapter_lowrank"])}
    ev = ModeEvaluator(modes, torch.from_numpy(mean), torch.from_numpy(sigma), _cap(sigma))
    for x, y in held:
        ev.update(x, y)
    res = {r.mode: r for r in ev.results()}
    xh = torch.cat([x for x, _ in held]).numpy()
    yh = torch.cat([y for _, y in held]).numpy()
    none = res["none"]
    cos = (xh * yh).sum(1) / np.linalg.norm(xh, axis=1) / np.linalg.norm(yh, axis=1)
    assert none.cosine == pytest.approx(cos.mean(), rel=1e-10)
    assert none.std_correlation == pytest.approx(np.corrcoef(xh.std(0, ddof=1), yh.std(0, ddof=1))[0, 1], rel=1e-9)
    assert none.mean_correlation == pytest.approx(np.corrcoef(xh.mean(0), yh.mean(0))[0, 1], rel=1e-9)
    assert none.tokens == len(xh) and none.outlier_dims == 0
    assert none.seeds.passed and not none.verdict.passed  # per-dim σ intact, the DiT sees another input
    assert res["adapter"].verdict.passed and res["adapter"].caption_error < 0.3 * none.caption_error
    assert res["adapter"].standardised_error < 0.01 * none.standardised_error
    assert res["moments"].caption_error > 3 * res["adapter"].caption_error
    mode, ok = ModeEvaluator.recommend(list(res.values()))
    assert ok and mode in ("adapter", "adapter_lowrank")
    table = results_markdown(list(res.values()), mode)
    assert f"**{mode}**" in table and table.count("\n") == 5


def test_without_model_the_standardised_space_decides_and_nothing_passes_falls_back():
    data, mean, sigma = _data(seed=1, prompts=6)
    ident = perdim_mode(torch.ones(D), torch.zeros(D))
    corr = ClassCorrection(torch.ones(len(TokenClass), D), torch.zeros(len(TokenClass), D))
    ev = ModeEvaluator({"none": ident, "classwise": classwise_mode(corr)}, torch.from_numpy(mean),
                       torch.from_numpy(sigma))
    for x, y in data:
        ev.update(x, y)
    res = ev.results()
    assert res[0].caption_cosine is None and res[0].verdict.space == "standardised"
    assert res[0].standardised_cosine == pytest.approx(res[1].standardised_cosine, rel=1e-6)
    mode, ok = ModeEvaluator.recommend(res)
    assert not ok and mode in ("none", "classwise")
    bad = ModeEvaluator({"bad": lambda x, labels=None: x[:-1]}, torch.from_numpy(mean), torch.from_numpy(sigma))
    with pytest.raises(ValueError, match="bad"):
        bad.update(*data[0])
