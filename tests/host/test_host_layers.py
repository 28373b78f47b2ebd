"""Hidden Layer Select inside a real ComfyUI: HF hidden_states parity, range errors, stock CLIPLoader CLIPs."""

from __future__ import annotations

import pytest
import torch

from zdf_testkit import tiny_qwen3 as tq

LOADER_ID = "DimFixQwen3EmbeddingLoader"
LAYER_ID = "DimFixHiddenLayerSelect"
DEPTH = 14
DEEP_DIR = "zdf_layers_deep"
TEXT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def deep(comfy):
    cfg = tq.tiny_config(hidden=64, layers=DEPTH, vocab=151936)
    sd = tq.make_state_dict(cfg, seed=21)
    tq.save_hf_folder(sd, cfg, comfy.models / "text_encoders" / DEEP_DIR, shards=3, flat=True)
    comfy.folder_paths.filename_list_cache.clear()
    return cfg, sd, tq.hf_model(sd, cfg)


@pytest.fixture(scope="module")
def clip(pack, deep):
    return pack.nodes[LOADER_ID].execute(model_name=DEEP_DIR, dtype="fp32", append_eos=False, analysis_only=True).args[0]


def select(pack, clip, layer):
    return pack.nodes[LAYER_ID].execute(clip=clip, layer=layer).args[0]


def encode(comfy, clip, text=TEXT):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0]


def ids_of(clip, text=TEXT):
    return [int(t) for t, _ in clip.tokenize(text)["qwen3_4b"][0]]


@pytest.mark.parametrize("layer", [-2, -6, -12, -DEPTH, 1, 5, DEPTH - 1])
def test_layer_parity(comfy, pack, deep, clip, layer):
    _, _, ref = deep
    hs = tq.run_hidden_states(ref, ids_of(clip))
    t, extra = encode(comfy, select(pack, clip, layer))[0]
    assert (t - hs[layer]).abs().max().item() <= 1e-4
    # Neighbouring layers really differ, so an off-by-one would fail the check above.
    other = layer - 1 if layer not in (1, -DEPTH) else layer + 1
    assert (t - hs[other]).abs().max().item() > 1e-2
    assert bool((extra["attention_mask"] == 1).all())


def test_input_clip_untouched(comfy, pack, deep, clip):
    _, _, ref = deep
    before = encode(comfy, clip)[0][0]
    picked = select(pack, clip, -6)
    assert picked is not clip and clip.layer_idx is None
    after = encode(comfy, clip)[0][0]
    assert torch.equal(before, after)
    assert (after - tq.run_hidden_states(ref, ids_of(clip))[-2]).abs().max().item() <= 1e-4
    # Selecting twice from a selected CLIP replaces the layer.
    again = select(pack, picked, 3)
    assert (encode(comfy, again)[0][0] - tq.run_hidden_states(ref, ids_of(clip))[3]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layer,why", [(0, "embedding"), (-DEPTH - 1, "embedding"), (DEPTH, "final-normed"),
                                       (-1, "final-normed"), (DEPTH + 1, "out of range"), (-DEPTH - 2, "out of range"),
                                       (500, "out of range")])
def test_rejected(pack, clip, layer, why):
    with pytest.raises(ValueError, match=why) as e:
        select(pack, clip, layer)
    msg = str(e.value)
    assert msg.startswith("Hidden Layer Select: ") and f"valid: 1..{DEPTH - 1} or -{DEPTH}..-2" in msg


def test_depth_read_from_model(comfy, pack):
    cfg = tq.tiny_config(hidden=64, layers=3)
    tq.save_single_file(tq.make_state_dict(cfg, seed=4), comfy.models / "text_encoders" / "zdf_layers_3.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    c3 = pack.nodes[LOADER_ID].execute(model_name="zdf_layers_3.safetensors", dtype="fp32", append_eos=False, analysis_only=True).args[0]
    assert select(pack, c3, -3).layer_idx == -3
    with pytest.raises(ValueError, match="valid: 1..2 or -3..-2"):
        select(pack, c3, -6)


def test_stock_cliploader_clip(comfy, pack, deep):
    """The stock CLIPLoader (lumina2) CLIP: same classes as stock; tiny width needs the test-only detection patch."""
    from zdf_testkit import tiny_zimage as tz

    cfg, sd, ref = deep
    tq.save_single_file(sd, comfy.models / "text_encoders" / "zdf_layers_stock.safetensors")
    comfy.folder_paths.filename_list_cache.clear()
    with tz.install_tiny_detection_patch():
        stock = comfy.nodes.CLIPLoader().load_clip("zdf_layers_stock.safetensors", "lumina2")[0]
    assert type(stock.cond_stage_model.qwen3_4b).__name__ == "Qwen3_4BModel"  # not the pack's subclass
    for layer in (-2, -6, 4):
        t = encode(comfy, select(pack, stock, layer))[0][0]
        assert (t - tq.run_hidden_states(ref, ids_of(stock))[layer]).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match=f"valid: 1..{DEPTH - 1}"):
        select(pack, stock, DEPTH)


def test_not_a_qwen3_clip(pack):
    class Fake:
        cond_stage_model = object()

    with pytest.raises(ValueError, match=r"input .clip. must be a Qwen3 text encoder for Z-Image .*got .object."):
        select(pack, Fake(), -2)
