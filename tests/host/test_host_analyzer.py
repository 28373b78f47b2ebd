"""Dimension Analyzer inside a real ComfyUI: tiny random Qwen3 encoders built through ComfyUI's own classes."""

from __future__ import annotations

import importlib

import pytest
import torch

from zdf_testkit import tiny_qwen3 as tq
from zdf_testkit import tiny_zimage as tz

NODE_ID = "DimFixDimensionAnalyzer"
HIDDEN = 64
N_LAYERS = 4
ALL_STATES = list(range(N_LAYERS + 1))
PROMPTS = ["a red fox in the snow", "an old lighthouse at dusk, oil painting", "macro photo of a dew drop",
           "a busy street market in the rain"]


SEEDS = {"reference": 1, "target": 2}
VOCABS = {"reference": 151936, "target": 151665}  # target: Qwen3-Embedding vocabulary


def tiny_weights(side: str) -> tuple[dict, dict]:
    config = tq.tiny_config(hidden=HIDDEN, layers=N_LAYERS, vocab=VOCABS[side])
    return tq.make_state_dict(config, seed=SEEDS[side]), config


def make_clip(comfy, sd: dict, config: dict):
    """A CLIP with the Z-Image tokenizer around a tiny Qwen3 (comfyui-host.md §2.1 fallback; test-only)."""
    zi = importlib.import_module("comfy.text_encoders.z_image")

    class Target:
        params: dict = {}
        clip = zi.te(dtype_llama=torch.float32)
        tokenizer = zi.ZImageTokenizer

    overrides = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size")}
    return comfy.sd.CLIP(Target(), state_dict=[sd], parameters=comfy.utils.calculate_parameters(sd),
                         model_options={"qwen3_4b_model_config": overrides})


@pytest.fixture(scope="module")
def clips(comfy):
    # reference: Qwen3-4B layout; target: Qwen3-Embedding layout (vocab 151665), other weights
    return make_clip(comfy, *tiny_weights("reference")), make_clip(comfy, *tiny_weights("target"))


@pytest.fixture(scope="module")
def node(pack):
    return pack.nodes[NODE_ID]


@pytest.fixture
def capture(pack, monkeypatch):
    """Records the AnalysisResult(s) the node computes."""
    analysis = importlib.import_module(pack.name + ".dimfix.analysis")
    results = []
    original = analysis.CorpusAnalysis.finish

    def finish(self, *args, **kwargs):
        res = original(self, *args, **kwargs)
        results.append(res)
        return res

    monkeypatch.setattr(analysis.CorpusAnalysis, "finish", finish)
    return results


@pytest.fixture
def fast_plots(pack, monkeypatch):
    """Skip the matplotlib figures (≈1 s per run) in tests that do not look at them."""
    import numpy as np

    analysis = importlib.import_module(pack.name + ".dimfix.analysis")
    monkeypatch.setattr(analysis.AnalysisResult, "plots", lambda self: [np.full((8, 8, 3), 255, np.uint8)])


@pytest.fixture
def forward_counts(clips, monkeypatch):
    """Counts the transformer forwards of each encoder: ``{"reference": n, "target": n}``."""
    counts = {"reference": 0, "target": 0}
    for name, clip in zip(("reference", "target"), clips):
        transformer = clip.cond_stage_model.qwen3_4b.transformer
        original = transformer.forward

        def counted(*a, _orig=original, _name=name, **k):
            counts[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(transformer, "forward", counted)
    return counts


def run(node, **kw):
    """``node.execute`` the way ComfyUI's executor runs every node: under ``torch.inference_mode()``."""
    kw.setdefault("prompts", "\n".join(PROMPTS))
    with torch.inference_mode():
        return node.execute(**kw)


def stock_cond(clip, text):
    """What CLIPTextEncode produces (default layer: HF -2)."""
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens_scheduled(tokens)
    ids = [t for t, _ in tokens["qwen3_4b"][0]]
    return cond[0][0][0], ids


def direct_stats(core, tensors_and_ids, scope="content"):
    st = core.stats.DimStats(tensors_and_ids[0][0].shape[-1])
    for x, ids in tensors_and_ids:
        st.update(x[core.tokens.scope_mask(core.tokens.classify_ids(ids), scope)])
    return st


def test_schema(node, pack):
    s = node.define_schema()
    assert s.node_id == NODE_ID and s.display_name == "Dimension Analyzer"
    assert s.category == importlib.import_module(pack.name + ".nodes.common").CATEGORY
    assert s.description and s.is_output_node
    for i in s.inputs:
        assert i.tooltip, i.id
    for o in s.outputs:
        assert o.tooltip, o.display_name
    ids = [i.id for i in s.inputs]
    for name in ("reference", "target", "prompts", "layer", "reference_layer", "sweep_all_layers", "outlier_ratio", "dead_abs",
                 "hyper_mult", "token_scope", "model", "reference_conditioning", "target_conditioning",
                 "save_name", "overwrite"):
        assert name in ids
    prompts = next(i for i in s.inputs if i.id == "prompts")
    assert "a " in prompts.default and len(prompts.default.splitlines()) > 50  # the calibration corpus
    assert "Empty = the pack's calibration corpus" in prompts.tooltip


def test_fix_tables_folder_registered_by_the_entrypoint(pack, comfy):
    import os

    paths, exts = comfy.folder_paths.folder_names_and_paths["fix_tables"]
    assert exts == {".safetensors"}
    assert os.path.join(comfy.folder_paths.models_dir, "fix_tables") in paths
    assert any(p.endswith("fix_tables") and os.path.isfile(os.path.join(p, "calibration_prompts.txt")) for p in paths)


def test_table_equals_core_stats_on_stock_conditioning(node, pack, clips, capture):
    ref_clip, tgt_clip = clips
    out = run(node, reference=ref_clip, target=tgt_clip)
    table, report, images = out.args
    core = pack.core
    assert isinstance(table, core.fixtable.FixTable)
    order = [PROMPTS[i] for i in core.repair.study_order(PROMPTS)]  # the node encodes in this order
    assert sorted(order) == sorted(PROMPTS)
    ref = direct_stats(core, [stock_cond(ref_clip, p) for p in order])
    tgt = direct_stats(core, [stock_cond(tgt_clip, p) for p in order])
    assert torch.equal(table.reference_mean, ref.float32()[0]) and torch.equal(table.reference_std, ref.float32()[1])
    assert torch.equal(table.target_mean, tgt.float32()[0]) and torch.equal(table.target_std, tgt.float32()[1])
    assert torch.equal(table.extras["target_p99"], tgt.percentiles([99.0])[99.0].float())
    assert table.meta.layer == -2 and table.meta.prompt_count == len(PROMPTS)
    assert table.meta.template == core.tokens.ZIMAGE_TEMPLATE
    assert "vocab 151936" in table.meta.reference_model and "vocab 151665" in table.meta.target_model
    comp = core.compare.compare(ref, tgt)
    res = capture[-1].result()
    assert res.comparison.outliers == comp.outliers and res.comparison.std_pearson == comp.std_pearson
    assert "| outlier dims |" in report and "## Most different dimensions" in report
    assert images.ndim == 4 and images.shape[0] == 5 and images.shape[-1] == 3
    assert out.ui["text"] == [report] and len(out.ui["images"]) == 5 and out.ui["images"][0]["type"] == "temp"
    # the CLIP's layer options were restored: stock encoding still gives HF -2
    assert ref_clip.cond_stage_model.qwen3_4b.layer == "hidden"
    assert ref_clip.cond_stage_model.qwen3_4b.layer_idx == -2


def test_encode_hidden_all_layers_match_stock_layers(pack, clips):
    analyzer = importlib.import_module(pack.name + ".nodes.comfy_access")
    ref_clip, _ = clips
    hidden, ids = analyzer.encode_layers(ref_clip, PROMPTS[1], ALL_STATES, "reference", "test")
    assert hidden.shape[0] == N_LAYERS + 1
    cond, stock_ids = stock_cond(ref_clip, PROMPTS[1])
    assert ids == stock_ids
    assert torch.equal(hidden[-2], cond)
    one, _ = analyzer.encode_layers(ref_clip, PROMPTS[1], [1], "reference", "test")
    assert torch.equal(one[0], hidden[1])
    # CLIPSetLastLayer(-3) on a clone == HF -3
    c = ref_clip.clone()
    c.clip_layer(-3)
    assert torch.equal(c.encode_from_tokens_scheduled(c.tokenize(PROMPTS[1]))[0][0][0], hidden[-3])


def test_all_layers_match_transformers_and_table_equals_core_stats_on_them(node, pack, clips, fast_plots):
    """The hidden states the analyzer feeds equal an independent transformers Qwen3Model, and the table equals
    the core statistics computed directly on the transformers hidden states."""
    analyzer = importlib.import_module(pack.name + ".nodes.comfy_access")
    core = pack.core
    per_side = {"reference": [], "target": []}
    for side, clip in zip(("reference", "target"), clips):
        hf = tq.hf_model(*tiny_weights(side))
        for p in PROMPTS:
            hidden, ids = analyzer.encode_layers(clip, p, ALL_STATES, side, "test")
            expected = torch.cat(tq.run_hidden_states(hf, ids))  # [L + 1, T, D]
            torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4)
            per_side[side].append((expected[-3], ids))
    table = run(node, reference=clips[0], target=clips[1], layer=-3, reference_layer=-3).args[0]
    for side, mean, std in (("reference", table.reference_mean, table.reference_std),
                            ("target", table.target_mean, table.target_std)):
        direct = direct_stats(core, per_side[side])
        torch.testing.assert_close(mean, direct.float32()[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, direct.float32()[1], rtol=1e-4, atol=1e-5)


def test_sweep_one_forward_per_prompt_and_equals_single_runs(node, clips, capture, forward_counts, fast_plots):
    ref_clip, tgt_clip = clips
    counts = forward_counts
    sweep_table = run(node, reference=ref_clip, target=tgt_clip, sweep_all_layers=True).args[0]
    assert counts == {"reference": len(PROMPTS), "target": len(PROMPTS)}
    sweep = capture[-1]
    assert sweep.layers == list(range(-(N_LAYERS + 1), 0))
    for k in (-5, -3, -2, -1):
        single_table = run(node, reference=ref_clip, target=tgt_clip, layer=k, reference_layer=k).args[0]
        single = capture[-1].result(k)
        got = sweep.result(k)
        for name in ("sigma_ref", "sigma_tgt", "mean_ref", "mean_tgt"):
            torch.testing.assert_close(getattr(got.comparison, name), getattr(single.comparison, name),
                                       rtol=1e-6, atol=0)
        assert got.comparison.outliers == single.comparison.outliers
        assert got.consistent == single.consistent and got.prompt_specific == single.prompt_specific
        assert got.cosine == pytest.approx(single.cosine, rel=1e-6)
        if k == -2:
            assert torch.equal(single_table.target_std, sweep_table.target_std)
    report = run(node, reference=ref_clip, target=tgt_clip, sweep_all_layers=True, layer=0,
                 reference_layer=0).args[1]
    assert "## Layer sweep" in report and "Recommended target layer" in report
    assert capture[-1].report_layer == -(N_LAYERS + 1) and capture[-1].reference_layer is None
    meta = run(node, reference=ref_clip, target=tgt_clip, layer=N_LAYERS, reference_layer=N_LAYERS).args[0].meta
    assert (meta.layer, meta.reference_layer) == (-1, -1)


def test_target_layer_against_reference_layer_equals_transformers_stats(node, pack, clips, capture, fast_plots):
    """layer -4 of the target against layer -2 of the reference (what a VL encoder at -6 vs Qwen3-4B at -2 does):
    the table equals the core statistics of transformers' hidden_states[-2] (reference) and [-4] (target)."""
    core = pack.core
    per_side = {"reference": [], "target": []}
    for side, clip, k in (("reference", clips[0], -2), ("target", clips[1], -4)):
        hf = tq.hf_model(*tiny_weights(side))
        for p in PROMPTS:
            ids = [t for t, _ in clip.tokenize(p)["qwen3_4b"][0]]
            per_side[side].append((tq.run_hidden_states(hf, ids)[k][0], ids))
    table = run(node, reference=clips[0], target=clips[1], layer=-4, reference_layer=-2).args[0]
    assert (table.meta.layer, table.meta.reference_layer) == (-4, -2)
    assert capture[-1].reference_layer == -2 and capture[-1].layers == [-4]
    for side, mean, std in (("reference", table.reference_mean, table.reference_std),
                            ("target", table.target_mean, table.target_std)):
        direct = direct_stats(core, per_side[side])
        torch.testing.assert_close(mean, direct.float32()[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, direct.float32()[1], rtol=1e-4, atol=1e-5)
    assert "target layer -4 vs reference layer -2" in capture[-1].report_markdown()
    # the default reference layer is -2 whatever the target layer
    assert run(node, reference=clips[0], target=clips[1], layer=-4).args[0].meta.reference_layer == -2


def test_sweep_against_a_fixed_reference_layer(node, clips, capture, forward_counts, fast_plots):
    """Every target layer vs the reference at -2, from one forward per prompt per encoder; each layer equals the
    single run of that pair."""
    ref_clip, tgt_clip = clips
    counts = forward_counts
    report = run(node, reference=ref_clip, target=tgt_clip, layer=-3, reference_layer=-2,
                 sweep_all_layers=True).args[1]
    assert counts == {"reference": len(PROMPTS), "target": len(PROMPTS)}
    sweep = capture[-1]
    assert sweep.reference_layer == -2 and sweep.report_layer == -3
    assert sweep.layers == list(range(-(N_LAYERS + 1), 0))
    assert "Every target layer k vs the reference at layer -2" in report
    for k in sweep.layers:
        run(node, reference=ref_clip, target=tgt_clip, layer=k, reference_layer=-2)
        single = capture[-1].result(k)
        got = sweep.result(k)
        assert got.reference_layer == single.reference_layer == -2
        for name in ("sigma_ref", "sigma_tgt", "mean_ref", "mean_tgt"):
            torch.testing.assert_close(getattr(got.comparison, name), getattr(single.comparison, name),
                                       rtol=1e-6, atol=0)
        assert got.comparison.outliers == single.comparison.outliers
        assert got.cosine == pytest.approx(single.cosine, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_dit(comfy):
    """The tiny Z-Image DiT (random weights, caption width = the encoders' width) loaded as a ComfyUI MODEL."""
    with tz.install_tiny_detection_patch(text_encoders=False):
        sd = tz.make_tiny_dit_state_dict(cap_feat_dim=HIDDEN, seed=3)
        return comfy.sd.load_diffusion_model_state_dict(sd)


def test_dit_aware_numbers_equal_direct_computation(node, pack, clips, capture, tiny_dit, fast_plots):
    ref_clip, tgt_clip = clips
    report = run(node, reference=ref_clip, target=tgt_clip, model=tiny_dit).args[1]
    res = capture[-1].result()
    core = pack.core
    gain, weight, bias, eps = tz.zimage_cap_embedder(tiny_dit)
    assert capture[-1].dit_eps == eps
    s_d = gain.double().abs() * weight.double().norm(dim=0)
    torch.testing.assert_close(res.sensitivity, s_d.float())
    s = s_d * res.comparison.sigma_ref.double()
    torch.testing.assert_close(res.influence, s.float())
    score = s * res.comparison.log_ratio.double().abs()
    assert [r["dim"] for r in res.dit_ranking[:5]] == torch.argsort(score, descending=True, stable=True)[:5].tolist()
    norm = torch.nn.RMSNorm(HIDDEN, eps=eps, dtype=torch.float64)
    linear = torch.nn.Linear(HIDDEN, weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(gain)
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    cos = []
    for p in PROMPTS:
        r, ids = stock_cond(ref_clip, p)
        t, _ = stock_cond(tgt_clip, p)
        m = core.tokens.scope_mask(core.tokens.classify_ids(ids), "content")
        with torch.no_grad():
            fa, fb = linear(norm(r[m].double())), linear(norm(t[m].double()))
        cos.append(torch.nn.functional.cosine_similarity(fa, fb, dim=-1))
    assert res.caption_cosine == pytest.approx(float(torch.cat(cos).mean()), abs=1e-6)
    assert "## DiT-aware view" in report


def test_dit_input_is_checked(node, clips, tiny_dit, comfy):
    ref_clip, tgt_clip = clips
    with tz.install_tiny_detection_patch(text_encoders=False):
        wide = comfy.sd.load_diffusion_model_state_dict(tz.make_tiny_dit_state_dict(cap_feat_dim=96, seed=4))
    with pytest.raises(ValueError, match="96-dim caption features but the encoders have 64"):
        run(node, reference=ref_clip, target=tgt_clip, model=wide)
    with pytest.raises(ValueError, match="not a Z-Image"):
        run(node, reference=ref_clip, target=tgt_clip, model=object())


def test_interrupt_mid_run_raises_and_writes_no_table(node, comfy, clips, monkeypatch):
    ref_clip, tgt_clip = clips
    calls = []

    def hook(value, total, preview, node_id=None):
        # ComfyUI >= 0.9.2 throttles updates but always delivers the first: interrupt there (after prompt 1)
        calls.append((value, total))
        comfy.mm.interrupt_current_processing()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    dest = comfy.models / "fix_tables" / "interrupted.safetensors"
    with pytest.raises(comfy.mm.InterruptProcessingException):
        run(node, reference=ref_clip, target=tgt_clip, save_name="interrupted")
    assert len(calls) == 1 and calls[0][0] == 1 < calls[0][1]  # stopped before the second of several prompts
    assert not dest.exists()
    assert not any(p.name.startswith(".interrupted") for p in dest.parent.iterdir())
    assert not comfy.mm.processing_interrupted()


def test_save_and_overwrite_refusal(node, pack, comfy, clips, fast_plots):
    ref_clip, tgt_clip = clips
    table = run(node, reference=ref_clip, target=tgt_clip, save_name="tiny_pair").args[0]
    dest = comfy.models / "fix_tables" / "tiny_pair.safetensors"
    saved = pack.core.fixtable.load_fix_table(dest)
    assert torch.equal(saved.target_std, table.target_std)
    assert "tiny_pair.safetensors" in comfy.folder_paths.get_filename_list("fix_tables")
    before = dest.read_bytes()
    with pytest.raises(ValueError, match="already exists; set 'overwrite' to true"):
        run(node, reference=ref_clip, target=tgt_clip, save_name="tiny_pair", prompts=PROMPTS[0] + "\n" + PROMPTS[1])
    assert dest.read_bytes() == before
    run(node, reference=ref_clip, target=tgt_clip, save_name="tiny_pair.safetensors", overwrite=True,
        prompts=PROMPTS[0] + "\n" + PROMPTS[1])
    assert pack.core.fixtable.load_fix_table(dest).meta.prompt_count == 2
    with pytest.raises(ValueError, match="not a plain file name"):
        run(node, reference=ref_clip, target=tgt_clip, save_name="../escape")


def test_conditioning_pair_mode_equals_encoder_mode(node, clips, fast_plots):
    ref_clip, tgt_clip = clips
    from_clips = run(node, reference=ref_clip, target=tgt_clip).args[0]
    ref_cond, tgt_cond = [], []
    for p in PROMPTS:
        ref_cond += ref_clip.encode_from_tokens_scheduled(ref_clip.tokenize(p))
        tgt_cond += tgt_clip.encode_from_tokens_scheduled(tgt_clip.tokenize(p))
    snapshot = [t[0].clone() for t in ref_cond]
    table = run(node, reference_conditioning=ref_cond, target_conditioning=tgt_cond).args[0]
    for name in ("reference_mean", "reference_std", "target_mean", "target_std"):
        assert torch.equal(getattr(table, name), getattr(from_clips, name)), name
    assert all(torch.equal(a[0], b) for a, b in zip(ref_cond, snapshot))
    assert table.meta.template == "" and table.meta.layer == -2 and table.meta.reference_layer == -2
    # a VL target taken at -6 elsewhere: both layers are recorded, the statistics are the same
    vl = run(node, reference_conditioning=ref_cond, target_conditioning=tgt_cond, layer=-6).args[0]
    assert (vl.meta.layer, vl.meta.reference_layer) == (-6, -2)
    assert torch.equal(vl.target_std, table.target_std) and torch.equal(vl.reference_std, table.reference_std)


def test_bad_inputs_give_clear_errors(node, clips):
    ref_clip, tgt_clip = clips
    cond = ref_clip.encode_from_tokens_scheduled(ref_clip.tokenize(PROMPTS[0]))
    with pytest.raises(ValueError, match="corpus is empty"):
        run(node, reference=ref_clip, target=tgt_clip, prompts="# only a comment\n\n")
    with pytest.raises(ValueError, match="connect both text encoders"):
        run(node, reference=ref_clip)
    with pytest.raises(ValueError, match="connect both 'reference_conditioning' and 'target_conditioning'"):
        run(node, reference_conditioning=cond)
    bad = [[cond[0][0].clone(), dict(cond[0][1])]]
    bad[0][0][0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"Dimension Analyzer: input 'target_conditioning', entry 0 contains 1 NaN/Inf"):
        run(node, reference_conditioning=cond, target_conditioning=bad)
    four = [[cond[0][0].unsqueeze(1).repeat(1, 3, 1, 1), dict(cond[0][1])]]
    with pytest.raises(ValueError, match="4-D"):
        run(node, reference_conditioning=cond, target_conditioning=four)
    wide = [[torch.zeros(1, cond[0][0].shape[1], HIDDEN + 8), {}]]
    with pytest.raises(ValueError, match="widths differ"):
        run(node, reference_conditioning=cond, target_conditioning=wide)
    with pytest.raises(ValueError, match="holds 1 sequences but 'target_conditioning' 2"):
        run(node, reference_conditioning=cond, target_conditioning=cond + cond)
    with pytest.raises(ValueError, match="layer 5 is out of range for 'target'"):
        run(node, reference=ref_clip, target=tgt_clip, layer=N_LAYERS + 1)
    with pytest.raises(ValueError, match=r"reference_layer -9 is out of range for 'reference', which has 5 HF hidden "
                                         r"states \(valid: -5 .. 4"):
        run(node, reference=ref_clip, target=tgt_clip, reference_layer=-9)
    with pytest.raises(ValueError, match="sweep_all_layers needs the 'reference' and 'target' encoders"):
        run(node, reference_conditioning=cond, target_conditioning=cond, sweep_all_layers=True)


def test_target_from_pack_loader_with_appended_eos(node, pack, comfy, clips, capture, fast_plots):
    """Qwen3-Embedding layout (HF folder, flat keys) through the pack's loader, with its appended <|endoftext|>:
    the extra token is labelled, left out of the content statistics and of the aligned cosine."""
    sd, config = tiny_weights("target")
    tq.save_hf_folder(sd, config, comfy.models / "text_encoders" / "zdf_analyzer_emb", shards=2, flat=True)
    comfy.folder_paths.filename_list_cache.clear()
    loader = pack.nodes["DimFixQwen3EmbeddingLoader"]
    with torch.inference_mode():
        emb = loader.execute(model_name="zdf_analyzer_emb", dtype="fp32", append_eos=True, analysis_only=True).args[0]
    ref_clip, tgt_clip = clips
    with_eos = run(node, reference=ref_clip, target=emb).args[0]
    res = capture[-1]
    without = run(node, reference=ref_clip, target=tgt_clip).args[0]
    base = capture[-1]
    assert res.class_counts["target"]["appended_eos"] == len(PROMPTS)
    assert res.class_counts["reference"]["appended_eos"] == 0
    assert res.class_counts["target"]["content"] == base.class_counts["target"]["content"]
    for name in ("target_mean", "target_std", "reference_std"):
        torch.testing.assert_close(getattr(with_eos, name), getattr(without, name), rtol=1e-5, atol=1e-6)
    assert res.result().cosine_tokens == base.result().cosine_tokens
    assert res.result().cosine == pytest.approx(base.result().cosine, abs=1e-5)


def test_empty_prompts_use_the_default_corpus(node, pack, clips, fast_plots):
    ref_clip, tgt_clip = clips
    table = run(node, reference=ref_clip, target=tgt_clip, prompts="  \n\n").args[0]
    assert table.meta.prompt_count == len(pack.core.corpus.load_default_corpus().prompts) > 50


def test_fingerprint_covers_widgets(node):
    a = node.fingerprint_inputs(prompts="x", layer=-2, reference=None)
    assert a == node.fingerprint_inputs(prompts="x", layer=-2, reference=None)
    assert a != node.fingerprint_inputs(prompts="y", layer=-2)
    assert a != node.fingerprint_inputs(prompts="x", layer=-3)
    assert a != node.fingerprint_inputs(prompts="x", layer=-2, reference_layer=-3)
    assert a != node.fingerprint_inputs(prompts="x", layer=-2, outlier_ratio=10.0)
    assert a != node.fingerprint_inputs(prompts="x", layer=-2, sweep_all_layers=True)


def test_fingerprint_changes_when_the_saved_table_goes(node, comfy, clips, fast_plots):
    """Deleting (or replacing) the saved table makes ComfyUI run the analyzer again instead of reusing its cache."""
    ref_clip, tgt_clip = clips
    widgets = dict(prompts=PROMPTS[0] + "\n" + PROMPTS[2], save_name="fp_probe", overwrite=True)
    dest = comfy.models / "fix_tables" / "fp_probe.safetensors"
    absent = node.fingerprint_inputs(**widgets)
    run(node, reference=ref_clip, target=tgt_clip, **widgets)
    saved = node.fingerprint_inputs(**widgets)
    assert dest.exists() and saved != absent and saved == node.fingerprint_inputs(**widgets)
    dest.unlink()
    assert node.fingerprint_inputs(**widgets) == absent
    assert node.fingerprint_inputs(prompts="x", save_name="../bad") == node.fingerprint_inputs(prompts="x",
                                                                                               save_name="../bad")
