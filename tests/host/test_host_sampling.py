"""Sampling through a real ComfyUI with a tiny Z-Image DiT: stock path, the pack's conditioning nodes, masks.

The tiny models come from ``zdf_testkit.tiny_zimage`` (random weights, ComfyUI key layouts); the
test-only detection patch makes ComfyUI build the tiny DiT as Z-Image. Every sample runs 2 steps of
``res_multistep``/``simple`` at cfg 1 on a 64×64 latent, as the stock Z-Image Turbo graph does at 1024².
"""

from __future__ import annotations

import importlib

import pytest
import torch

from zdf_testkit import tiny_zimage as tz

LOADER_ID = "DimFixQwen3EmbeddingLoader"
LAYERS_ID = "DimFixHiddenLayerSelect"
FIX_ID = "DimFixEmbeddingDimensionFix"
BLEND_ID = "DimFixEmbeddingBlend"
ANALYZER_ID = "DimFixDimensionAnalyzer"
PROMPT = "a photo of a cat sleeping in the sun"
CAL_PROMPTS = ["a red fox in the snow", "an old lighthouse at dusk, oil painting", "macro photo of a dew drop",
               "a busy street market in the rain", "portrait of an astronaut, studio light"]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def patched(comfy):
    patch = tz.install_tiny_detection_patch()
    yield patch
    patch.uninstall()


@pytest.fixture(scope="module")
def tiny(comfy):
    models = tz.write_tiny_models(comfy.models)
    comfy.folder_paths.filename_list_cache.clear()
    return models


def run_node(node, **inputs):
    """``node.execute`` the way ComfyUI's executor runs every node: under ``torch.inference_mode()``."""
    with torch.inference_mode():
        return node.execute(**inputs)


def load_substitute(comfy, pack, tiny):
    """The substitute encoder (HF folder, flat keys, vocab 151665) through the pack's Qwen3 Embedding Loader."""
    loader = pack.nodes[LOADER_ID]
    return run_node(loader, model_name=tiny.names["substitute"], dtype="default", append_eos=False,
                    analysis_only=True).args[0]


@pytest.fixture(scope="module")
def stack(comfy, pack, patched, tiny):
    """Tiny DiT, reference TE (stock CLIPLoader path), substitute TE, TAESD."""
    nodes = comfy.nodes
    model = comfy.sd.load_diffusion_model(str(tiny.dit))
    clip = nodes.CLIPLoader().load_clip(tiny.names["te"], "lumina2")[0]
    vae = nodes.VAELoader().load_vae(tiny.names["vae"])[0]
    sub = load_substitute(comfy, pack, tiny)
    return model, clip, sub, vae


class Recorder:
    """Records what the diffusion model receives (``model_function_wrapper``); optionally aborts the run."""

    class Abort(Exception):
        pass

    def __init__(self, abort: bool = False):
        self.calls: list[dict] = []
        self.abort = abort

    def __call__(self, apply_model, args):
        c = args["c"]
        self.calls.append({"keys": set(c), "context": tuple(c["c_crossattn"].shape),
                           "mask": None if "attention_mask" not in c else c["attention_mask"].clone()})
        if self.abort:
            raise Recorder.Abort()
        return apply_model(args["input"], args["timestep"], **c)


def sample(comfy, model, pos, neg=None, seed=42, recorder=None):
    nodes = comfy.nodes
    if neg is None:
        neg = nodes.ConditioningZeroOut().zero_out(pos)[0]
    if recorder is not None:
        model = model.clone()
        model.set_model_unet_function_wrapper(recorder)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with torch.inference_mode():
        return nodes.common_ksampler(model, seed, 2, 1.0, "res_multistep", "simple", pos, neg, latent)[0]["samples"]


def encode(comfy, clip, text=PROMPT):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0]


# ------------------------------------------------------------------------------------------- test kit
def test_tiny_dit_layout_equals_comfy_nextdit(comfy):
    ops = importlib.import_module("comfy.ops")
    lumina = importlib.import_module("comfy.ldm.lumina.model")
    cfg = tz.tiny_dit_config(dim=384, heads=3, layers=3, cap_feat_dim=96)
    cfg.pop("image_model")
    expected = {k: tuple(v.shape) for k, v in lumina.NextDiT(**cfg, operations=ops.disable_weight_init)
                .state_dict().items()}
    ours = tz.make_tiny_dit_state_dict(dim=384, heads=3, layers=3, cap_feat_dim=96, seed=1)
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert all(v.dtype == torch.bfloat16 for v in ours.values())


def test_tiny_taesd_layout_equals_comfy_taesd(comfy):
    taesd = importlib.import_module("comfy.taesd.taesd")
    expected = {k: tuple(v.shape) for k, v in taesd.TAESD(latent_channels=16).state_dict().items()}
    ours = tz.make_tiny_taesd16_state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert sum(v.numel() for v in ours.values()) == pytest.approx(2.46e6, rel=0.01)


def test_tiny_dit_sizes_are_validated():
    with pytest.raises(ValueError, match="dim must equal heads × 128"):
        tz.make_tiny_dit_state_dict(dim=200, heads=2)
    with pytest.raises(ValueError, match=">= 256"):
        tz.make_tiny_dit_state_dict(dim=128, heads=1)


def test_patch_needed_and_uninstall_restores(comfy, tiny):
    md = importlib.import_module("comfy.model_detection")
    sm = importlib.import_module("comfy.supported_models")
    before = (md.detect_unet_config, dict(sm.ZImage.unet_config), comfy.sd.detect_te_model,
              comfy.sd.load_text_encoder_state_dicts)
    sd = tz.make_tiny_dit_state_dict()
    assert "z_image_modulation" not in md.detect_unet_config(sd, "")  # stock: not recognised as Z-Image
    with tz.install_tiny_detection_patch() as patch:
        cfg = md.detect_unet_config(sd, "")
        assert cfg["z_image_modulation"] and cfg["n_heads"] == 2 and cfg["pad_tokens_multiple"] == 32
        assert cfg["cap_feat_dim"] == tz.CAP_FEAT_DIM and cfg["n_layers"] == tz.DIT_LAYERS
        assert tz.install_tiny_detection_patch() is patch
    assert not patch.installed
    after = (md.detect_unet_config, dict(sm.ZImage.unet_config), comfy.sd.detect_te_model,
             comfy.sd.load_text_encoder_state_dicts)
    assert after == before


def test_cap_embedder_reads_the_loaded_weights(comfy, stack, tiny):
    model = stack[0]
    assert type(model.model.model_config).__name__ == "ZImage"
    gain, w, b, eps = tz.zimage_cap_embedder(model)
    sd = comfy.utils.load_torch_file(str(tiny.dit), safe_load=True)
    assert torch.equal(gain, sd["cap_embedder.0.weight"].float())
    assert torch.equal(w, sd["cap_embedder.1.weight"].float())
    assert torch.equal(b, sd["cap_embedder.1.bias"].float())
    assert w.shape == (tz.DIT_DIM, tz.CAP_FEAT_DIM) and eps == pytest.approx(1e-5)


# ------------------------------------------------------------------------------------------- stock path
def test_stock_graph_samples_and_decodes(comfy, stack):
    model, clip, _, vae = stack
    pos = encode(comfy, clip)
    assert pos[0][0].shape == (1, 17, tz.CAP_FEAT_DIM)  # templated tokens of PROMPT
    rec = Recorder()
    z = sample(comfy, model, pos, recorder=rec)
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all() and z.abs().max() > 0
    assert rec.calls and all(c["mask"] is None and c["context"] == (1, 17, tz.CAP_FEAT_DIM) for c in rec.calls)
    image = comfy.nodes.VAEDecode().decode(vae, {"samples": z})[0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1
    # same seed, same conditioning -> same latent; other prompt -> other latent (the caption reaches the image)
    assert torch.equal(sample(comfy, model, pos), z)
    assert not torch.allclose(sample(comfy, model, encode(comfy, clip, "a mountain at sunset")), z)


def test_recorder_sees_a_mask_with_zeros(comfy, stack):
    """Negative control: a mask with zeros is forwarded to the DiT (what our nodes must never produce)."""
    model, clip, _, _ = stack
    pos = encode(comfy, clip)
    mask = pos[0][1]["attention_mask"].clone()
    mask[:, -2:] = 0
    bad = [[pos[0][0], {**pos[0][1], "attention_mask": mask}]]
    rec = Recorder(abort=True)
    with pytest.raises(Recorder.Abort):
        sample(comfy, model, bad, neg=bad, recorder=rec)
    assert rec.calls[0]["mask"] is not None and int(rec.calls[0]["mask"].sum()) == 15


# ------------------------------------------------------------------------------------------- pack nodes
@pytest.fixture(scope="module")
def fix_table(pack, stack):
    analyzer = pack.nodes[ANALYZER_ID]
    _, clip, sub, _ = stack
    out = run_node(analyzer, reference=clip, target=sub, prompts="\n".join(CAL_PROMPTS), layer=-2)
    table = out.args[0]
    assert table.dim == tz.CAP_FEAT_DIM
    return table


def assert_all_ones_masks(cond):
    for t, meta in cond:
        mask = meta["attention_mask"]
        assert mask.dtype == torch.int64 and mask.shape == t.shape[:2] and bool((mask == 1).all())


@pytest.mark.parametrize("mode", ["none", "rescale", "mask", "clamp", "full", "affine", "mask_mean", "clamp_pct"])
def test_fix_node_conditioning_samples(comfy, pack, stack, fix_table, mode):
    fix = pack.nodes[FIX_ID]
    assert mode in pack.core.fixes.MODES
    model, _, sub, _ = stack
    raw = encode(comfy, sub)
    cond = run_node(fix, conditioning=raw, mode=mode, strength=1.0, token_scope="content",
                    fix_table=fix_table).args[0]
    assert_all_ones_masks(cond)
    assert cond[0][0].shape == raw[0][0].shape
    if mode == "none":
        assert torch.equal(cond[0][0], raw[0][0])
    elif mode in ("full", "affine"):  # every dim is remapped to the reference moments
        assert not torch.allclose(cond[0][0], raw[0][0])
    # the output changes exactly where the plan touches dims
    touched = pack.core.fixes.plan_fix(fix_table, mode).dims.numel() > 0
    assert (not torch.equal(cond[0][0], raw[0][0])) == touched
    rec = Recorder()
    z = sample(comfy, model, cond, recorder=rec)
    assert torch.isfinite(z).all()
    assert rec.calls and all(c["mask"] is None for c in rec.calls)


def test_blend_node_conditioning_samples(comfy, pack, stack, fix_table):
    blend = pack.nodes[BLEND_ID]
    model, clip, sub, _ = stack
    primary, secondary = encode(comfy, clip), encode(comfy, sub, PROMPT + ", detailed")
    for outliers in ("none", "mean"):
        cond = run_node(blend, primary=primary, secondary=secondary, alpha=0.8, align="pool", outliers=outliers,
                        rms_match=True, fix_table=fix_table).args[0]
        assert_all_ones_masks(cond)
        assert cond[0][0].shape == primary[0][0].shape
        rec = Recorder()
        z = sample(comfy, model, cond, recorder=rec)
        assert torch.isfinite(z).all() and all(c["mask"] is None for c in rec.calls)


def test_hidden_layer_select_conditioning_samples(comfy, pack, stack):
    layers = pack.nodes[LAYERS_ID]
    model, clip, sub, _ = stack
    for source in (clip, sub):
        default = encode(comfy, source)
        chosen = run_node(layers, clip=source, layer=-6).args[0]
        cond = encode(comfy, chosen)
        assert cond[0][0].shape == default[0][0].shape and not torch.allclose(cond[0][0], default[0][0])
        assert_all_ones_masks(cond)
        rec = Recorder()
        z = sample(comfy, model, cond, recorder=rec)
        assert torch.isfinite(z).all() and all(c["mask"] is None for c in rec.calls)


def test_pack_nodes_refuse_a_mask_with_zeros(comfy, pack, stack, fix_table):
    """A conditioning with mask zeros is rejected before it can reach the sampler."""
    _, clip, _, _ = stack
    pos = encode(comfy, clip)
    mask = pos[0][1]["attention_mask"].clone()
    mask[:, -1] = 0
    bad = [[pos[0][0], {**pos[0][1], "attention_mask": mask}]]
    fix, blend = pack.nodes[FIX_ID], pack.nodes[BLEND_ID]
    with pytest.raises(ValueError, match="attention_mask"):
        fix.execute(conditioning=bad, mode="affine", strength=1.0, token_scope="content", fix_table=fix_table)
    with pytest.raises(ValueError, match="attention_mask"):
        blend.execute(primary=bad, secondary=pos, alpha=0.8, align="pool", outliers="none", rms_match=True)
    with pytest.raises(ValueError, match="attention_mask"):
        blend.execute(primary=pos, secondary=bad, alpha=0.8, align="pool", outliers="none", rms_match=True)


def test_source_recorded_from_loader_to_fix(comfy, pack, stack, fix_table, tiny, caplog):
    """The pack loader's conditionings name their encoder and layer; the Fix node checks them against the table,
    marks its output as fixed and warns on a second fix; a blend drops the source; the stock CLIP records none."""
    import logging

    _, clip, sub, _ = stack
    fix, blend, layers = pack.nodes[FIX_ID], pack.nodes[BLEND_ID], pack.nodes[LAYERS_ID]
    keys = pack.core.conditioning
    raw = encode(comfy, sub)
    meta = raw[0][1]
    assert meta[keys.MODEL_KEY] == fix_table.meta.target_model
    assert meta[keys.MODEL_KEY].startswith(tiny.names["substitute"] + "@") and meta[keys.LAYER_KEY] == -2
    stock = encode(comfy, clip)
    assert keys.MODEL_KEY not in stock[0][1] and keys.LAYER_KEY not in stock[0][1]
    args = dict(mode="affine", strength=1.0, token_scope="content", fix_table=fix_table)
    with caplog.at_level(logging.WARNING):
        once = run_node(fix, conditioning=raw, **args).args[0]
    assert "comes from" not in caplog.text and "already fixed" not in caplog.text
    assert once[0][1][keys.FIX_KEY].startswith("affine at strength 1, table " + fix_table.meta.target_model)
    assert keys.FIX_KEY not in raw[0][1]  # the input dict is untouched
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_node(fix, conditioning=once, **args)
    assert "was already fixed (affine at strength 1" in caplog.text
    # layer -6 of the same encoder against the layer -2 table
    deep = encode(comfy, run_node(layers, clip=sub, layer=-6).args[0])
    assert deep[0][1][keys.LAYER_KEY] == -6 and deep[0][1][keys.MODEL_KEY] == meta[keys.MODEL_KEY]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_node(fix, conditioning=deep, **args)
    assert "comes from layer -6 but the fix table was measured on layer -2" in caplog.text
    # another encoder's conditioning against the substitute's table
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_node(fix, conditioning=[[raw[0][0], {**meta, keys.MODEL_KEY: "other@0000"}]], **args)
    assert "comes from encoder 'other@0000'" in caplog.text
    mixed = run_node(blend, primary=raw, secondary=stock, alpha=0.8, align="pool", outliers="none",
                     rms_match=True).args[0]
    assert keys.MODEL_KEY not in mixed[0][1] and keys.LAYER_KEY not in mixed[0][1]
    # the conditioning-pair analysis names the target from the recorded source
    analyzer = pack.nodes[ANALYZER_ID]
    table = run_node(analyzer, reference_conditioning=stock, target_conditioning=raw).args[0]
    assert table.meta.target_model == meta[keys.MODEL_KEY]
    # a conditioning with the recorded keys samples like any other
    rec = Recorder()
    z = sample(comfy, stack[0], once, recorder=rec)
    assert torch.isfinite(z).all() and all(c["mask"] is None for c in rec.calls)


# ------------------------------------------------------------------------------------------- learned modes
STUDY_PROMPTS = [f"{a} {b}" for a in ("a red", "an old", "a tiny", "a glass", "a wooden", "a neon")
                 for b in ("fox in the snow", "lighthouse at dusk", "teapot on a table", "bicycle in the rain",
                       "castle on a hill")]


@pytest.fixture(scope="module")
def learned_table(pack, stack):
    model, clip, sub, _ = stack
    out = run_node(pack.nodes[ANALYZER_ID], reference=clip, target=sub, prompts="\n".join(STUDY_PROMPTS), model=model)
    return out.args[0], out.args[1]


def test_analyzer_table_carries_learned_modes_and_a_recommendation(pack, learned_table):
    table, report = learned_table
    core = pack.core
    assert "## Repair modes on held-out prompts" in report and f"`{table.meta.recommended_mode}`" in report
    assert table.meta.recommended_mode in (*core.fixes.MODES, *core.repair.LEARNED_MODES)
    d = tz.CAP_FEAT_DIM
    assert table.extras["adapter_weight"].shape == (d, d) and table.extras["class_scale"].shape == (4, d)
    assert table.extras["adapter_lowrank_u"].shape[0] == d
    for mode in ("adapter", "per_class", "none", "affine"):
        assert f"| {mode} |" in report or f"| **{mode}** |" in report


@pytest.mark.parametrize("mode", ["auto", "adapter", "adapter_lowrank", "per_class"])
def test_learned_modes_through_fix_sample(comfy, pack, stack, learned_table, mode):
    table, _ = learned_table
    model, _, sub, _ = stack
    raw = encode(comfy, sub)
    cond = run_node(pack.nodes[FIX_ID], conditioning=raw, mode=mode, strength=1.0, token_scope="content",
                    fix_table=table).args[0]
    assert_all_ones_masks(cond)
    expected = pack.core.repair.fix_function(table, mode, 1.0, table.meta.thresholds, "content")(raw[0][0])
    assert torch.equal(cond[0][0], expected) and not torch.equal(cond[0][0], raw[0][0])
    assert raw[0][0].data_ptr() != cond[0][0].data_ptr()
    rec = Recorder()
    z = sample(comfy, model, cond, recorder=rec)
    assert torch.isfinite(z).all() and all(c["mask"] is None for c in rec.calls)
