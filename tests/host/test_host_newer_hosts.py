"""What newer ComfyUI hosts changed, on both hosts: DynamicVRAM's clone(disable_dynamic=True), core Qwen3-VL
CLIPs (0.26+), a quantized (scaled fp8) reference CLIP, and V3 search aliases. Where a feature does not exist on
a host, the test asserts what that host does instead."""

from __future__ import annotations

import importlib

import pytest
import torch

from zdf_testkit import tiny_qwen3 as tq
from zdf_testkit import tiny_zimage as tz
from zdf_testkit.live_comfy import host_version

LOADER_ID = "DimFixQwen3EmbeddingLoader"
LAYER_ID = "DimFixHiddenLayerSelect"
ANALYZER_ID = "DimFixDimensionAnalyzer"
DEPTH = 8
PROMPTS = ["a red fox in fresh snow", "an old brass telescope on a desk", "two boats at dawn, long exposure",
           "a bowl of ramen with steam rising", "a castle on a hill under storm clouds"]
TEXT_FILE = "zdf_newer_qwen3.safetensors"
VL_FILE = "zdf_newer_qwen3vl.safetensors"
FP8_FILE = "zdf_newer_qwen3_fp8.safetensors"


@pytest.fixture(scope="module")
def weights(comfy):
    cfg = tq.tiny_config(hidden=64, layers=DEPTH, vocab=151936)
    sd = tq.make_state_dict(cfg, seed=31)
    te = comfy.models / "text_encoders"
    tq.save_single_file(sd, te / TEXT_FILE)
    tz.save_safetensors(tz.tiny_qwen3vl_state_dict(sd), te / VL_FILE)
    tz.save_safetensors(scaled_fp8(sd), te / FP8_FILE)
    comfy.folder_paths.filename_list_cache.clear()
    return cfg, sd


def scaled_fp8(sd: dict) -> dict:
    """The "scaled fp8" layout ComfyUI reads on every host: fp8 Linear weights with a per-tensor scale."""
    out = {"scaled_fp8": torch.ones(2)}  # 2 entries: full-precision matmul on any device
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            scale = v.abs().max().clamp(min=1e-8) / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def pack_clip(pack, weights):
    return pack.nodes[LOADER_ID].execute(model_name=TEXT_FILE, dtype="fp32", append_eos=False,
                                         analysis_only=True).args[0]


def encode(comfy, clip, text=PROMPTS[0]):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


def test_loader_clip_survives_clone_without_dynamic_vram(comfy, pack_clip):
    patcher_mod = importlib.import_module("comfy.model_patcher")
    if "disable_dynamic" not in pack_clip.clone.__code__.co_varnames:  # 0.8: no DynamicVRAM, no such argument
        assert host_version() < (0, 16)
        with pytest.raises(TypeError):
            pack_clip.clone(disable_dynamic=True)
        assert encode(comfy, pack_clip.clone()).equal(encode(comfy, pack_clip))
        return
    init = pack_clip.patcher.cached_patcher_init
    assert init is not None and callable(init[0])
    # A DynamicVRAM patcher (NVIDIA default since 0.16) asks the factory for a non-dynamic copy; the CPU's
    # patcher is not dynamic, so take that branch for this instance only.
    pack_clip.patcher.is_dynamic = lambda: True
    try:
        copy = pack_clip.clone(disable_dynamic=True)
    finally:
        del pack_clip.patcher.is_dynamic
    assert type(copy.patcher) is patcher_mod.ModelPatcher and copy.patcher.model is not pack_clip.patcher.model
    assert encode(comfy, copy).equal(encode(comfy, pack_clip))
    # negative control: a CLIP without the factory cannot be cloned that way (what stock did for custom loaders)
    bare = pack_clip.clone()
    bare.patcher.cached_patcher_init = None
    bare.patcher.is_dynamic = lambda: True
    with pytest.raises(RuntimeError, match="cached_patcher_init"):
        bare.clone(disable_dynamic=True)


def load_stock(comfy, name):
    with tz.install_tiny_detection_patch():
        return comfy.nodes.CLIPLoader().load_clip(name, "lumina2")[0]


def test_core_qwen3vl_clip_through_layer_select_and_analyzer(comfy, pack, weights, pack_clip):
    cfg, sd = weights
    access = importlib.import_module(pack.name + ".nodes.comfy_access")
    if host_version() < (0, 26):  # no Qwen3-VL CLIP in core: the pack's loader says what the file is
        with pytest.raises(ValueError, match="a Qwen3-VL checkpoint .*0.26 or newer load it with the stock Load CLIP"):
            pack.nodes[LOADER_ID].execute(model_name=VL_FILE, analysis_only=True)
        assert "qwen3vl" not in comfy.sd.TEModel.__members__.__repr__().lower()
        return
    vl = load_stock(comfy, VL_FILE)
    assert vl.cond_stage_model.clip.startswith("qwen3vl")
    ids = [int(t) for t, _ in next(iter(vl.tokenize(PROMPTS[0]).values()))[0]]
    assert ids[-4:] == [151667, 271, 151668, 271]  # core's VL template ends with an empty think block
    picked = pack.nodes[LAYER_ID].execute(clip=vl, layer=-6).args[0]
    hidden, got_ids = access.encode_layers(vl, PROMPTS[0], list(range(DEPTH + 1)), "clip", "test")
    assert got_ids == ids and encode(comfy, picked).equal(hidden[-6].unsqueeze(0))
    assert not encode(comfy, picked).equal(hidden[-5].unsqueeze(0))
    with torch.inference_mode():
        out = pack.nodes[ANALYZER_ID].execute(reference=pack_clip, target=vl, prompts="\n".join(PROMPTS), layer=-6)
    table, report = out.args[0], out.args[1]
    assert "Qwen3-VL" in report and "think" in report
    assert table.meta.layer == -6 and table.meta.reference_layer == -2
    assert torch.isfinite(table.target_std).all()


def test_fp8_reference_clip_in_the_analyzer(comfy, pack, weights, pack_clip):
    access = importlib.import_module(pack.name + ".nodes.comfy_access")
    fp8 = load_stock(comfy, FP8_FILE)
    hidden, _ = access.encode_layers(fp8, PROMPTS[1], [DEPTH - 1], "reference", "test")
    exact, _ = access.encode_layers(pack_clip, PROMPTS[1], [DEPTH - 1], "reference", "test")
    assert hidden.dtype == torch.float32
    err = ((hidden - exact).norm() / exact.norm()).item()
    assert 0 < err < 0.1  # quantized: close to the bf16/fp32 weights' states, not equal
    with torch.inference_mode():
        table = pack.nodes[ANALYZER_ID].execute(reference=fp8, target=pack_clip, prompts="\n".join(PROMPTS)).args[0]
    for t in (table.reference_mean, table.reference_std):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    # the pack's own loader refuses the quantized file, naming the dtype and what to do
    with pytest.raises(ValueError, match="F8_E4M3.*stock Load CLIP"):
        pack.nodes[LOADER_ID].execute(model_name=FP8_FILE, analysis_only=True)


def test_search_aliases_where_the_host_has_them(pack):
    io = importlib.import_module("comfy_api.latest").io
    fields = {f for f in io.Schema.__dataclass_fields__}
    for node in pack.node_list:
        schema = node.define_schema()
        if "search_aliases" in fields:
            assert "dimfix" in schema.search_aliases, schema.node_id
        else:
            assert not hasattr(schema, "search_aliases")
