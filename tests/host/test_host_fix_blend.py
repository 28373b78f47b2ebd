"""Embedding Dimension Fix and Embedding Blend inside a real ComfyUI: schemas, outputs vs the core."""

from __future__ import annotations

import logging

import pytest
import torch

FIX_ID = "DimFixEmbeddingDimensionFix"
BLEND_ID = "DimFixEmbeddingBlend"
D = 2560


def make_table(core, seed=0, d=D, **meta):
    g = torch.Generator().manual_seed(seed)
    ref_std = torch.rand(d, generator=g) + 0.5
    tgt_std = ref_std * torch.exp(torch.randn(d, generator=g) * 0.3)
    tgt_std[[4, 9]] *= torch.tensor([20.0, 0.05])
    return core.fixtable.FixTable(torch.randn(d, generator=g), ref_std, torch.randn(d, generator=g), tgt_std,
                                  meta=core.fixtable.FixTableMeta(**meta))


def make_cond(entries=2, t=11, d=D, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(entries):
        x = torch.randn(batch, t + i, d, generator=g) * 3
        out.append([x, {"pooled_output": torch.full((batch, 4), float(i)), "attention_mask":
                        torch.ones(batch, t + i, dtype=torch.int64)}])
    return out


def snapshot(cond):
    return [(id(e), id(e[0]), id(e[1]), e[0].clone(), dict(e[1]), {k: v.clone() for k, v in e[1].items()
                                                                   if isinstance(v, torch.Tensor)}) for e in cond]


def assert_untouched(cond, snap):
    for e, (ie, it, im, t0, m0, tens) in zip(cond, snap):
        assert (id(e), id(e[0]), id(e[1])) == (ie, it, im)
        assert torch.equal(e[0], t0) and set(e[1]) == set(m0)
        for k, v in tens.items():
            assert torch.equal(e[1][k], v)


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.nodes[FIX_ID], pack.nodes[BLEND_ID]


@pytest.mark.parametrize("node_id,name", [(FIX_ID, "Embedding Dimension Fix"), (BLEND_ID, "Embedding Blend")])
def test_schema_has_descriptions_and_tooltips(pack, node_id, name):
    node = pack.nodes[node_id]
    schema = node.GET_SCHEMA()
    schema.validate()
    info = node.GET_NODE_INFO_V1()
    assert info["display_name"] == name and info["category"] == "Z-Image DimFix" and info["description"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert inputs
    for key, spec in inputs.items():
        assert spec[1].get("tooltip"), f"input {key} of {node_id} has no tooltip"
    assert info["output"] == ["CONDITIONING"]
    assert all(info["output_tooltips"])
    assert "FIX_TABLE" == info["input"]["optional"]["fix_table"][0]


def test_fix_mode_options_and_default(pack, nodes):
    info = nodes[0].GET_NODE_INFO_V1()
    mode = info["input"]["required"]["mode"]
    expected = ["auto", *pack.core.fixes.MODES, "per_class", "adapter", "adapter_lowrank"]
    assert list(mode[1]["options"]) == expected and mode[1]["default"] == "auto"
    assert info["input"]["required"]["table_file"][1]["options"][0] == "none"


@pytest.mark.parametrize("mode,scope", [("affine", "content"), ("full", "all"), ("clamp", "no_sink"),
                                        ("clamp_pct", "content")])
def test_fix_node_equals_core_on_every_entry(pack, nodes, mode, scope):
    fix = nodes[0]
    core = pack.core
    table = make_table(core)
    cond = make_cond(entries=3)
    snap = snapshot(cond)
    out = fix.execute(conditioning=cond, mode=mode, strength=0.7, token_scope=scope, table_file="none",
                      fix_table=table).args[0]
    assert_untouched(cond, snap)
    assert out is not cond and len(out) == 3
    for (t, m), (t0, m0) in zip(out, cond):
        expected = core.fixes.apply_scoped(t0, core.fixes.plan_fix(table, mode, 0.7), scope)
        assert torch.equal(t, expected)
        assert not torch.equal(t, t0)
        assert m is not m0 and m["pooled_output"] is m0["pooled_output"]
        assert m["attention_mask"].dtype == torch.int64 and m["attention_mask"].shape == (1, t0.shape[1])
        assert bool(torch.all(m["attention_mask"] == 1))


def test_fix_node_threshold_override_and_bf16(pack, nodes):
    core = pack.core
    table = make_table(core)
    cond = [[c.to(torch.bfloat16), m] for c, m in make_cond(entries=1)]
    out = nodes[0].execute(conditioning=cond, mode="rescale", strength=1.0, token_scope="all",
                           fix_table=table, outlier_ratio=10.0).args[0]
    th = core.config.Thresholds(outlier_ratio=10.0)
    assert out[0][0].dtype == torch.bfloat16
    assert torch.equal(out[0][0], core.fixes.apply_scoped(cond[0][0], core.fixes.plan_fix(table, "rescale", thresholds=th)))
    with pytest.raises(ValueError, match="outlier_ratio must be > 1"):
        nodes[0].execute(conditioning=cond, mode="rescale", strength=1.0, token_scope="all", fix_table=table,
                         outlier_ratio=0.5)


def test_fix_node_width_mismatch_names_both_widths(pack, nodes):
    table = make_table(pack.core, d=64)
    with pytest.raises(ValueError, match="entry 0 has width 2560 but the fix table .* has width 64"):
        nodes[0].execute(conditioning=make_cond(entries=1), mode="full", strength=1.0, token_scope="all",
                         fix_table=table)


def test_fix_node_rejects_bad_inputs(pack, nodes):
    fix = nodes[0]
    table = make_table(pack.core)
    with pytest.raises(ValueError, match="no fix table"):
        fix.execute(conditioning=make_cond(), mode="full", strength=1.0, token_scope="all", table_file="none")
    bad = make_cond(entries=1)
    bad[0][1]["attention_mask"][0, -3:] = 0
    with pytest.raises(ValueError, match="attention_mask has 3 zero"):
        fix.execute(conditioning=bad, mode="full", strength=1.0, token_scope="all", fix_table=table)
    with pytest.raises(ValueError, match="select one layer"):
        fix.execute(conditioning=[[torch.zeros(1, 4, 5, D), {}]], mode="full", strength=1.0, token_scope="all",
                    fix_table=table)
    with pytest.raises(ValueError, match="must be a fix table"):
        fix.execute(conditioning=make_cond(), mode="full", strength=1.0, token_scope="all", fix_table="x")


def test_fix_node_saved_table_file_and_provenance_warning(pack, comfy, nodes, caplog):
    core = pack.core
    table = make_table(core, seed=3, layer=-6, token_scope="content")
    name = "host_test_table.safetensors"
    core.fixtable.save_fix_table(table, comfy.models / "fix_tables" / name, overwrite=True)
    info = nodes[0].GET_NODE_INFO_V1()
    assert name in info["input"]["required"]["table_file"][1]["options"]
    cond = make_cond(entries=1)
    cond[0][1]["dimfix_layer"] = -2
    with caplog.at_level(logging.WARNING):
        out = nodes[0].execute(conditioning=cond, mode="full", strength=1.0, token_scope="all",
                               table_file=name).args[0]
    assert torch.equal(out[0][0], core.fixes.apply_scoped(cond[0][0], core.fixes.plan_fix(table, "full")))
    assert "cover 'content' tokens" in caplog.text and "layer -2" in caplog.text
    assert nodes[0].fingerprint_inputs(table_file=name) != nodes[0].fingerprint_inputs(table_file="none")


def test_blend_node_output_mask_and_values(pack, nodes):
    core = pack.core
    blend_node = nodes[1]
    primary = make_cond(entries=2, t=9, seed=1)
    secondary = make_cond(entries=2, t=23, seed=2)
    snaps = snapshot(primary), snapshot(secondary)
    out = blend_node.execute(primary=primary, secondary=secondary, alpha=0.8, align="pool", outliers="none",
                             rms_match=True).args[0]
    assert_untouched(primary, snaps[0])
    assert_untouched(secondary, snaps[1])
    assert len(out) == 2
    for (t, m), (p, pm) in zip(out, primary):
        assert t.shape == p.shape
        assert torch.equal(t, core.blend.blend(p, secondary[0][0], 0.8, align="pool", rms_match=True))
        assert m["attention_mask"].shape == (1, p.shape[1]) and bool(torch.all(m["attention_mask"] == 1))
        assert m["pooled_output"] is pm["pooled_output"]


def test_blend_node_with_table_outliers(pack, nodes):
    core = pack.core
    table = make_table(core)
    primary, secondary = make_cond(entries=1, t=7, seed=4), make_cond(entries=1, t=1, seed=5)
    out = nodes[1].execute(primary=primary, secondary=secondary, alpha=0.5, align="pad_mean", outliers="mean",
                           rms_match=False, fix_table=table).args[0]
    expected = core.blend.blend(primary[0][0], secondary[0][0], 0.5, align="pad_mean", outliers="mean", table=table)
    assert torch.equal(out[0][0], expected) and torch.isfinite(out[0][0]).all()
    with pytest.raises(ValueError, match="no fix table"):
        nodes[1].execute(primary=primary, secondary=secondary, alpha=0.5, align="pool", outliers="mean",
                         rms_match=False)


def test_blend_node_width_mismatch(pack, nodes):
    with pytest.raises(ValueError, match="primary entry 0 has width 2560 but the secondary has width 4096"):
        nodes[1].execute(primary=make_cond(entries=1), secondary=make_cond(entries=1, d=4096), alpha=0.5,
                         align="pool", outliers="none", rms_match=False)
