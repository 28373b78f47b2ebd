"""Qwen3 Embedding Loader inside a real ComfyUI: parity with transformers, layouts, options, errors, server import."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import json
from pathlib import Path

import pytest
import torch

from zdf_testkit import tiny_qwen3 as tq

LOADER_ID = "DimFixQwen3EmbeddingLoader"
LAYER_ID = "DimFixHiddenLayerSelect"
PROMPTS = ["", "a photo of a cat", "(red:1.5) fox, <|im_start|> literal", " ".join(["word"] * 290) + " end."]
EMB_DIR = "zdf_loader_emb"               # HF folder, flat keys, vocab 151665, 2 shards
EMB_FILE = "zdf_loader_emb.safetensors"  # the same weights, ComfyUI layout, one file


@pytest.fixture(scope="module")
def emb(comfy):
    cfg = tq.tiny_config(hidden=64, layers=4, vocab=151665)
    sd = tq.make_state_dict(cfg, seed=11)
    te = comfy.models / "text_encoders"
    tq.save_hf_folder(sd, cfg, te / EMB_DIR, shards=2, flat=True)
    tq.save_single_file(sd, te / EMB_FILE)
    comfy.folder_paths.filename_list_cache.clear()
    return cfg, sd, tq.hf_model(sd, cfg)


def load(pack, name, dtype="fp32", append_eos=False):
    return pack.nodes[LOADER_ID].execute(model_name=name, dtype=dtype, append_eos=append_eos, analysis_only=True).args[0]


def encode(comfy, clip, text):
    return comfy.nodes.CLIPTextEncode().encode(clip, text)[0]


def ids_of(clip, text):
    return [int(t) for t, _ in clip.tokenize(text)["qwen3_4b"][0]]


def test_combo_lists_folder_once(comfy, pack, emb):
    schema = pack.nodes[LOADER_ID].define_schema()
    options = schema.inputs[0].options
    assert EMB_DIR in options and EMB_FILE in options
    assert not any(o.startswith(EMB_DIR + os.sep) for o in options)  # shards are not listed
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)


def test_tokenizer_ids_match_transformers(comfy, pack, emb):
    from transformers import Qwen2Tokenizer

    template = pack.core.tokens.ZIMAGE_TEMPLATE
    clip = load(pack, EMB_DIR)
    tok = Qwen2Tokenizer.from_pretrained(str(Path(os.environ["COMFYUI_PATH"]) / "comfy/text_encoders/qwen25_tokenizer"))
    for text in PROMPTS:
        assert ids_of(clip, text) == tok(template.format(text))["input_ids"]
    assert ids_of(clip, "a cat") == tq.zimage_ids([64, 8251])


def test_parity_with_transformers(comfy, pack, emb):
    cfg, sd, ref = emb
    clip = load(pack, EMB_DIR)
    assert clip.cond_stage_model.qwen3_4b.num_layers == 4
    for text in PROMPTS:
        ids = ids_of(clip, text)
        cond = encode(comfy, clip, text)
        assert len(cond) == 1
        t, extra = cond[0]
        expected = tq.run_hidden_states(ref, ids)[-2]
        assert t.dtype == torch.float32 and t.shape == (1, len(ids), 64)
        assert (t - expected).abs().max().item() <= 1e-4, text[:20]
        mask = extra["attention_mask"]
        assert mask.dtype == torch.int64 and mask.shape == (1, len(ids)) and bool((mask == 1).all())
    assert len(ids_of(clip, PROMPTS[-1])) >= 300 and len(ids_of(clip, "")) == 8


@pytest.mark.slow
def test_zimage_width_takes_comfyui_detection_path_with_parity(comfy, pack, tmp_path):
    """At Z-Image's width (2560) ComfyUI's own detection builds the CLIP (no test patch): the pack's loader must
    give the same conditioning as transformers there too. 3 thin layers, Qwen3-Embedding vocabulary, one file."""
    cfg = tq.tiny_config(hidden=2560, layers=3, heads=2, kv_heads=1, intermediate=64, vocab=151665)
    sd = tq.make_state_dict(cfg, seed=21)
    name = "zdf_loader_wide.safetensors"
    tq.save_single_file(sd, comfy.models / "text_encoders" / name, flat=True)
    comfy.folder_paths.filename_list_cache.clear()
    assert comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.QWEN3_4B  # ComfyUI's own detection applies
    clip = load(pack, name)
    inner = clip.cond_stage_model.qwen3_4b
    assert inner.num_layers == 3 and inner.transformer.get_input_embeddings().weight.shape == (151665, 2560)
    ref = tq.hf_model(sd, cfg)
    for text in ("a photo of a cat", ""):
        ids = ids_of(clip, text)
        t = encode(comfy, clip, text)[0][0]
        expected = tq.run_hidden_states(ref, ids)[-2]
        assert t.shape == (1, len(ids), 2560)
        assert ((t - expected).abs().max() / expected.abs().max()).item() <= 1e-5, text
    del clip, ref
    (comfy.models / "text_encoders" / name).unlink()
    comfy.folder_paths.filename_list_cache.clear()


def test_progress_per_shard_and_interrupt_stops_loading(comfy, pack, emb, monkeypatch):
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append((value, total))
        comfy.mm.interrupt_current_processing()  # at the first update: the one no host throttles

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(comfy.mm.InterruptProcessingException):
        load(pack, EMB_DIR)  # 2 shards: interrupted before the second one is read
    assert calls == [(0, 2)]
    assert not comfy.mm.processing_interrupted()
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        calls.append((value, total)))
    calls.clear()
    assert load(pack, EMB_DIR) is not None
    # first and last always arrive; newer hosts may throttle the one in between (>= 100 ms, >= 0.5 % apart)
    assert calls[0] == (0, 2) and calls[-1] == (2, 2) and calls in ([(0, 2), (1, 2), (2, 2)], [(0, 2), (2, 2)])


def test_comfy_layout_file_identical(comfy, pack, emb):
    a, b = load(pack, EMB_DIR), load(pack, EMB_FILE)
    for text in PROMPTS[:3]:
        ca, cb = encode(comfy, a, text), encode(comfy, b, text)
        assert torch.equal(ca[0][0], cb[0][0])
        assert torch.equal(ca[0][1]["attention_mask"], cb[0][1]["attention_mask"])


def test_dtype_options(comfy, pack, emb):
    cfg, sd, ref = emb
    ids = None
    for dtype, expected, tol in (("default", torch.float32, 1e-4), ("bf16", torch.bfloat16, 0.1), ("fp32", torch.float32, 1e-4)):
        clip = load(pack, EMB_FILE, dtype=dtype)
        w = clip.cond_stage_model.qwen3_4b.transformer.model.layers[0].self_attn.q_proj.weight
        assert w.dtype == expected, dtype
        ids = ids_of(clip, "a cat")
        t = encode(comfy, clip, "a cat")[0][0]
        ex = tq.run_hidden_states(ref, ids)[-2]
        rel = ((t - ex).norm() / ex.norm()).item()
        assert rel <= tol, (dtype, rel)
    assert "fp16" not in pack.nodes[LOADER_ID].define_schema().inputs[1].options
    assert "fp16" in pack.nodes[LOADER_ID].define_schema().inputs[1].tooltip


def test_fp16_file_loads_as_bf16(comfy, pack, emb, caplog):
    """'default' never keeps fp16 (Qwen3's massive activations overflow it): an fp16 file loads as bf16."""
    import logging

    cfg, sd, ref = emb
    name = "zdf_loader_fp16.safetensors"
    tq.save_single_file({k: v.half() for k, v in sd.items()}, comfy.models / "text_encoders" / name)
    comfy.folder_paths.filename_list_cache.clear()
    with caplog.at_level(logging.WARNING):
        clip = load(pack, name, dtype="default")
    w = clip.cond_stage_model.qwen3_4b.transformer.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16
    assert "stored in fp16" in caplog.text and "bf16" in caplog.text
    assert load(pack, name, dtype="fp32").cond_stage_model.qwen3_4b.transformer.model.layers[0].self_attn.q_proj \
        .weight.dtype == torch.float32


def test_bf16_file_stays_bf16(comfy, pack):
    cfg = tq.tiny_config(hidden=64, layers=3)
    tq.save_single_file(tq.make_state_dict(cfg, seed=3, dtype=torch.bfloat16),
                        comfy.models / "text_encoders" / "zdf_loader_bf16.safetensors", flat=True)
    clip = load(pack, "zdf_loader_bf16.safetensors", dtype="default")
    assert clip.cond_stage_model.qwen3_4b.transformer.model.norm.weight.dtype == torch.bfloat16


def test_append_eos(comfy, pack, emb):
    cfg, sd, ref = emb
    plain, eos = load(pack, EMB_DIR), load(pack, EMB_DIR, append_eos=True)
    for text in ("a photo of a cat", ""):
        ids, ids_eos = ids_of(plain, text), ids_of(eos, text)
        assert ids_eos == ids + [151643]
        t, extra = encode(comfy, eos, text)[0]
        assert t.shape[1] == len(ids) + 1
        assert bool((extra["attention_mask"] == 1).all()) and extra["attention_mask"].shape == (1, len(ids) + 1)
        # The appended token is attended: equals transformers with no mask on the full sequence.
        expected = tq.run_hidden_states(ref, ids_eos)[-2]
        assert (t - expected).abs().max().item() <= 1e-4
        # Prefix tokens are unchanged by the appended one (causal attention).
        assert (t[:, :-1] - encode(comfy, plain, text)[0][0]).abs().max().item() <= 1e-4
    # Clones (e.g. Hidden Layer Select) keep the option.
    assert ids_of(pack.nodes[LAYER_ID].execute(clip=eos, layer=-3).args[0], "x")[-1] == 151643


def test_literal_endoftext_never_masks(comfy, pack, emb):
    cfg, sd, ref = emb
    clip = load(pack, EMB_DIR)
    text = "before <|endoftext|> after"
    ids = ids_of(clip, text)
    assert 151643 in ids
    t, extra = encode(comfy, clip, text)[0]
    assert bool((extra["attention_mask"] == 1).all())
    assert (t - tq.run_hidden_states(ref, ids)[-2]).abs().max().item() <= 1e-4


def test_fingerprint_inputs(comfy, pack, emb):
    node = pack.nodes[LOADER_ID]
    a = node.fingerprint_inputs(model_name=EMB_DIR, dtype="fp32", append_eos=False)
    assert a == node.fingerprint_inputs(model_name=EMB_DIR, dtype="fp32", append_eos=False)
    assert a != node.fingerprint_inputs(model_name=EMB_DIR, dtype="bf16", append_eos=False)
    assert a != node.fingerprint_inputs(model_name=EMB_DIR, dtype="fp32", append_eos=True)
    assert a.split("|")[0] == pack.core.checkpoint.fingerprint_path(comfy.models / "text_encoders" / EMB_DIR)


def test_width_other_than_zimage_needs_analysis_only(comfy, pack, emb):
    node = pack.nodes[LOADER_ID]
    with pytest.raises(ValueError, match=f"{EMB_FILE} has width 64, but Z-Image reads 2560-wide.*analysis_only"):
        node.execute(model_name=EMB_FILE, dtype="default", append_eos=False)
    assert node.execute(model_name=EMB_FILE, analysis_only=True).args[0] is not None


def _bad_inputs(te: Path, cfg, sd):
    bad = {}
    (te / "zdf_bad_pickle.bin").write_bytes(b"\x80\x04junk")
    os.makedirs(te / "zdf_bad_picklefolder", exist_ok=True)
    (te / "zdf_bad_picklefolder" / "config.json").write_text("{}")
    (te / "zdf_bad_picklefolder" / "pytorch_model.bin").write_bytes(b"junk")
    folder = tq.save_hf_folder(sd, cfg, te / "zdf_bad_shard", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    bad["zdf_bad_shard"] = "model-00002-of-00002.safetensors.*missing"
    nan = {k: v.clone() for k, v in sd.items()}
    nan["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")  # loads and encodes "fine" in stock ComfyUI
    tq.save_single_file(nan, te / "zdf_bad_nan.safetensors")
    bad["zdf_bad_nan.safetensors"] = "'model.layers.0.mlp.down_proj.weight' has 1 NaN/Inf values"
    folder = tq.save_hf_folder(sd, cfg, te / "zdf_bad_escape", shards=2)
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("model-00002-of-00002.safetensors", "../zdf_bad_nan.safetensors"))
    bad["zdf_bad_escape"] = "outside the model folder"
    p = tq.save_single_file(sd, te / "zdf_bad_trunc.safetensors")
    p.write_bytes(p.read_bytes()[:-5000])
    bad["zdf_bad_trunc.safetensors"] = "truncated"
    tq.save_single_file({k: v for k, v in sd.items() if "q_norm" not in k and "k_norm" not in k},
                        te / "zdf_bad_noqnorm.safetensors")
    bad["zdf_bad_noqnorm.safetensors"] = "not Qwen3"
    tq.save_single_file({k: v for k, v in sd.items() if not k.startswith(("model.layers.2.", "model.layers.3."))},
                        te / "zdf_bad_2layers.safetensors")
    bad["zdf_bad_2layers.safetensors"] = "2 layers; at least 3"
    tq.save_single_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(128, 8),
                         "model.layers.0.post_attention_layernorm.weight": torch.zeros(8)},
                        te / "zdf_bad_notqwen.safetensors")
    bad["zdf_bad_notqwen.safetensors"] = "not a Qwen3 text encoder"
    return bad


def test_bad_inputs(comfy, pack, emb):
    cfg, sd, _ = emb
    te = comfy.models / "text_encoders"
    bad = _bad_inputs(te, cfg, sd)
    comfy.folder_paths.filename_list_cache.clear()
    options = pack.nodes[LOADER_ID].define_schema().inputs[0].options
    node = pack.nodes[LOADER_ID]
    for name, pattern in bad.items():
        assert name in options, name
        with pytest.raises(ValueError, match=pattern) as e:
            node.execute(model_name=name, dtype="default", append_eos=False)
        msg = str(e.value)
        assert msg.startswith("Qwen3 Embedding Loader: ") and name in msg, msg
        assert e.value.__cause__ is None and e.value.__suppress_context__
        assert isinstance(node.fingerprint_inputs(model_name=name), str)
    # Pickle files and pickle-only folders are listed (a user reaches the message); chosen, they are refused unread.
    for name in ("zdf_bad_pickle.bin", "zdf_bad_picklefolder"):
        assert name in options
        with pytest.raises(ValueError, match="arbitrary code.*safetensors") as e:
            node.execute(model_name=name)
        assert name in str(e.value)
    with pytest.raises(ValueError, match="not found"):
        node.execute(model_name="zdf_missing.safetensors")


# ------------------------------------------------------------------------------------------- server smoke
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_imports_pack(tmp_path):
    from zdf_testkit import host_env

    comfy_path = Path(os.environ["COMFYUI_PATH"]).resolve()
    root = Path(__file__).resolve().parents[2]
    base, front = tmp_path / "base", tmp_path / "front"
    for d in ("custom_nodes", "models/text_encoders", "output", "input", "temp", "user"):
        (base / d).mkdir(parents=True, exist_ok=True)
    front.mkdir()
    os.symlink(root, base / "custom_nodes" / "zimage_dimfix")
    port = _free_port()
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
           str(base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--log-stdout",
           "--front-end-root", str(front)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT, env=host_env.server_env())
    try:
        info = None
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        text = log_path.read_text()
        assert info is not None, f"server did not answer (rc={proc.poll()}):\n{text[-3000:]}"
        bad = [ln for ln in text.splitlines() if ("IMPORT FAILED" in ln or "Cannot import" in ln) and "zimage_dimfix" in ln]
        assert not bad, "\n".join(bad) + "\n" + text[-3000:]
        for node_id, display in ((LOADER_ID, "Qwen3 Embedding Loader"), (LAYER_ID, "Hidden Layer Select")):
            assert node_id in info, node_id
            spec = info[node_id]
            assert spec["display_name"] == display, node_id
            assert spec["category"] == "Z-Image DimFix" and spec["description"]
            for name, entry in spec["input"]["required"].items():
                assert entry[1].get("tooltip"), (node_id, name)
            assert all(spec["output_tooltips"]), node_id
        assert info[LAYER_ID]["input"]["required"]["layer"][1]["default"] == -2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(base / "custom_nodes", ignore_errors=True)
