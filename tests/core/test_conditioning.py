"""CONDITIONING helpers: validation messages and pure mapping."""

from __future__ import annotations

import logging

import pytest
import torch

from dimfix import conditioning as C


def cond(t=5, d=2560, batch=1, mask=True):
    meta = {"pooled_output": None}
    if mask:
        meta["attention_mask"] = torch.ones(batch, t, dtype=torch.int64)
    return [[torch.randn(batch, t, d, generator=torch.Generator().manual_seed(t)), meta]]


def test_ones_mask():
    m = C.ones_mask(2, 3)
    assert m.dtype == torch.int64 and m.shape == (2, 3) and bool(torch.all(m == 1))


def test_map_tensors_returns_new_structures_and_keeps_input():
    src = cond(5) + [[torch.randn(1, 4, 2560), {"pooled_output": torch.ones(1, 7), "extra": "x"}]]
    snapshot = [[t.clone(), dict(m)] for t, m in src]
    ids = [id(src), id(src[0]), id(src[0][1]), id(src[1][1])]
    out = C.map_tensors(src, lambda t, meta: t[:, :3] * 2)
    assert out is not src and out[0] is not src[0] and out[0][1] is not src[0][1]
    assert [id(src), id(src[0]), id(src[0][1]), id(src[1][1])] == ids
    for (t, m), (t0, m0) in zip(src, snapshot):
        assert torch.equal(t, t0) and set(m) == set(m0)
    assert src[0][1]["attention_mask"].shape == (1, 5)
    assert "attention_mask" not in src[1][1]
    for (t, m), (t0, _) in zip(out, src):
        assert torch.equal(t, t0[:, :3] * 2)
        assert m["attention_mask"].dtype == torch.int64 and m["attention_mask"].shape == (1, 3)
        assert bool(torch.all(m["attention_mask"] == 1))
    assert out[1][1]["pooled_output"] is src[1][1]["pooled_output"] and out[1][1]["extra"] == "x"
    assert "pooled_output" in out[0][1] and out[0][1]["pooled_output"] is None


def test_map_tensors_mask_policy_for_other_widths():
    out = C.map_tensors(cond(4, d=16, mask=False), lambda t, m: t)
    assert "attention_mask" not in out[0][1]
    out = C.map_tensors(cond(4, d=16, mask=True), lambda t, m: t[:, :2])
    assert out[0][1]["attention_mask"].shape == (1, 2)
    with pytest.raises(ValueError, match=r"must return a \(batch, tokens, width\) tensor"):
        C.map_tensors(cond(4, d=16), lambda t, m: t[0])


def test_validate_accepts_stock_conditioning():
    C.validate(cond(13), width=2560)


@pytest.mark.parametrize("value,match", [
    ("text", "input 'positive' expects a CONDITIONING .* got str"),
    ([], "input 'positive' is an empty CONDITIONING"),
    ([torch.zeros(1, 2, 3)], r"entry 0: expected a \[tensor, dict\] pair"),
    ([[torch.zeros(1, 2, 3), None]], "expected a dict second"),
    ([["t", {}]], "expected a tensor first"),
    ([[torch.zeros(1, 3, 2, 8), {}]], "'all layers' output; select one layer"),
    ([[torch.zeros(2, 8), {}]], r"shape \(batch, tokens, width\)"),
    ([[torch.zeros(1, 0, 8), {}]], "no tokens"),
    ([[torch.zeros(1, 2, 8, dtype=torch.int64), {}]], "not floating point"),
])
def test_validate_rejects_bad_structures(value, match):
    with pytest.raises(ValueError, match=match):
        C.validate(value, socket="positive")


def test_validate_rejects_nan_inf_with_counts():
    t = torch.zeros(1, 3, 8)
    t[0, 0, :2] = float("nan")
    t[0, 2, 5] = float("-inf")
    with pytest.raises(ValueError, match="2 NaN and 1 Inf value"):
        C.validate([[t, {}]])


def test_validate_rejects_mask_zeros_and_explains():
    c = cond(6)
    c[0][1]["attention_mask"][0, 4:] = 0
    with pytest.raises(ValueError, match="attention_mask has 2 zero.*trimmed"):
        C.validate(c)


def test_validate_width_mismatch():
    with pytest.raises(ValueError, match="width 4096 does not match the expected width 2560"):
        C.validate(cond(3, d=4096), socket="conditioning", width=2560)


def test_validate_warns_on_fp16(caplog):
    c = cond(3, d=8)
    c[0][0] = c[0][0].half()
    with caplog.at_level(logging.WARNING):
        C.validate(c)
    assert "fp16" in caplog.text and "overflow" in caplog.text
    c[0][0][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="use bf16 or fp32"):
        C.validate(c)


def test_map_tensors_sets_and_drops_keys_on_new_dicts():
    src = cond(5)
    src[0][1].update({C.MODEL_KEY: "emb@1", C.LAYER_KEY: -2})
    out = C.map_tensors(src, lambda t, meta: t.clone(), set_keys={C.FIX_KEY: "affine"}, drop_keys=C.SOURCE_KEYS)
    assert out[0][1][C.FIX_KEY] == "affine" and "pooled_output" in out[0][1]
    assert C.MODEL_KEY not in out[0][1] and C.LAYER_KEY not in out[0][1]
    assert src[0][1][C.MODEL_KEY] == "emb@1" and C.FIX_KEY not in src[0][1]
    # the mask is always the new all-ones mask, whatever set_keys says
    out = C.map_tensors(src, lambda t, meta: t[:, :2], set_keys={"attention_mask": torch.zeros(1, 5)})
    assert torch.equal(out[0][1]["attention_mask"], C.ones_mask(1, 2))


def test_provenance_warnings_compare_only_recorded_facts():
    unknown = cond(4)
    assert C.provenance_warnings(unknown, "emb@1", -2) == []
    same = [[unknown[0][0], {**unknown[0][1], C.MODEL_KEY: "emb@1", C.LAYER_KEY: -2}]]
    assert C.provenance_warnings(same, "emb@1", -2) == []
    other = [same[0], [same[0][0], {C.MODEL_KEY: "vl@2", C.LAYER_KEY: -6, C.FIX_KEY: "full at strength 1"}]]
    msgs = C.provenance_warnings(other, "emb@1", -2)
    assert msgs == ["conditioning entry 1 comes from encoder 'vl@2' but the fix table was measured on encoder "
                    "'emb@1'",
                    "conditioning entry 1 comes from layer -6 but the fix table was measured on layer -2",
                    "conditioning entry 1 was already fixed (full at strength 1); fixing it again compounds the "
                    "corrections"]
    # a table without a recorded target model checks the layer only
    assert len(C.provenance_warnings(other, "", -2)) == 2


def test_sequences_of_conditionings_from_elsewhere():
    a = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    src = [[a, {"attention_mask": mask}], [a[:1, :1].clone(), {}]]
    snap = a.clone()
    seqs = C.sequences(src, "target_conditioning", "Dimension Analyzer")
    assert [tuple(x.shape) for x in seqs] == [(4, 8), (6, 8), (1, 8)]  # padded tokens trimmed; T = 1 kept
    assert torch.equal(seqs[0], a[0, :4]) and torch.equal(seqs[1], a[1]) and torch.equal(a, snap)
    half = C.sequences([[a.half(), {}]])
    assert half[0].dtype == torch.float16  # accepted; the analysis upcasts to float64
    bad = a.clone()
    bad[1, 2, 3] = float("inf")
    bad[0, 0, 0] = float("nan")
    cases = [
        ([[bad, {}]], r"Dimension Analyzer: input 'target_conditioning', entry 0 contains 2 NaN/Inf value\(s\)"),
        ([[a.unsqueeze(1), {}]], r"entry 0 has shape \(2, 1, 6, 8\) \(4-D: several layers\)"),
        ([[a[0], {}]], r"entry 0 has shape \(6, 8\); expected \[batch, tokens, width\]"),
        ([[a.long(), {}]], "not floating point"),
        ([[a, {"attention_mask": torch.ones(2, 5)}]], r"attention_mask of shape \(2, 5\) does not match"),
        ([[a[:1], {"attention_mask": torch.zeros(1, 6)}]], "batch item 0 has no unmasked token"),
        ([], "must be a non-empty CONDITIONING"),
        ([["x", {}]], r"entry 0 is not a \[tensor, dict\] pair"),
    ]
    for value, match in cases:
        with pytest.raises(ValueError, match=match):
            C.sequences(value, "target_conditioning", "Dimension Analyzer")


def test_validate_names_the_node():
    with pytest.raises(ValueError, match=r"^Embedding Blend: input 'primary' is an empty CONDITIONING"):
        C.validate([], "primary", node="Embedding Blend")
