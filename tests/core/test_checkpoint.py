"""Qwen3 checkpoint reader: layouts, inferred architecture, overrides, errors, listing, no copies."""

from __future__ import annotations

import builtins
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dimfix import checkpoint as ck
from zdf_testkit.tiny_qwen3 import make_state_dict, save_hf_folder, save_single_file, tiny_config


@pytest.fixture(scope="module")
def tiny():
    # Small vocab keeps the core tier fast; the reader does not care about the vocabulary size.
    cfg = tiny_config(hidden=64, layers=3, heads=2, kv_heads=1, intermediate=96, vocab=1000)
    return cfg, make_state_dict(cfg, seed=1, lm_head=True)


def _layouts(tmp_path, cfg, sd):
    return {
        "single_comfy": save_single_file(sd, tmp_path / "te.safetensors"),
        "single_flat": save_single_file(sd, tmp_path / "flat.safetensors", flat=True),
        "hf_single": save_hf_folder(sd, cfg, tmp_path / "hf1"),
        "hf_sharded_flat": save_hf_folder(sd, cfg, tmp_path / "hf3", shards=3, flat=True),
        "hf_sharded": save_hf_folder(sd, cfg, tmp_path / "hf2", shards=2),
    }


def test_layouts_identical(tmp_path, tiny):
    cfg, sd = tiny
    expected = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
    results = {name: ck.read_qwen3_checkpoint(p) for name, p in _layouts(tmp_path, cfg, sd).items()}
    for name, r in results.items():
        assert set(r.state_dict) == set(expected), name
        for k, v in expected.items():
            assert torch.equal(r.state_dict[k], v), (name, k)
        assert r.info == ck.Qwen3Info(hidden=64, layers=3, heads=2, kv_heads=1, head_dim=128, intermediate=96,
                                      vocab=1000, dtype=torch.float32, has_q_norm=True), name
    assert len(results["hf_sharded"].source_files) == 2
    assert len(results["hf_sharded_flat"].source_files) == 3
    assert results["single_comfy"].dropped_keys == ["lm_head.weight"]


def test_on_file_reports_progress_and_can_stop_the_read(tmp_path, tiny):
    cfg, sd = tiny
    folder = _layouts(tmp_path, cfg, sd)["hf_sharded_flat"]
    calls = []
    r = ck.read_qwen3_checkpoint(folder, on_file=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)] and len(r.source_files) == 3

    class Stop(Exception):
        pass

    def stop_after_first(done, total):
        if done == 1:
            raise Stop

    with pytest.raises(Stop):
        ck.read_qwen3_checkpoint(folder, on_file=stop_after_first)


def test_vocab_151665_and_overrides(tmp_path):
    cfg = tiny_config(hidden=64, layers=4, vocab=151665, rope_theta=5e5)
    cfg["max_position_embeddings"] = 32768
    sd = make_state_dict(cfg, seed=2)
    r = ck.read_qwen3_checkpoint(save_hf_folder(sd, cfg, tmp_path / "emb", shards=2, flat=True))
    assert r.info.vocab == 151665
    assert r.comfy_overrides() == {
        "vocab_size": 151665, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 1, "num_key_value_heads": 1, "rope_theta": 5e5, "max_position_embeddings": 32768,
    }
    # A single file has no config.json: only shape-derived overrides.
    r1 = ck.read_qwen3_checkpoint(save_single_file(sd, tmp_path / "emb.safetensors", flat=True))
    assert "rope_theta" not in r1.comfy_overrides() and r1.comfy_overrides()["vocab_size"] == 151665


def test_overrides_empty_for_stock_shapes():
    info = ck.Qwen3Info(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
                        vocab=151936, dtype=torch.bfloat16, has_q_norm=True)
    c = ck.Qwen3Checkpoint(state_dict={}, info=info, source_files=[], fingerprint="x",
                           config={"rope_theta": 1000000, "rms_norm_eps": 1e-06, "max_position_embeddings": 40960})
    assert c.comfy_overrides() == {}
    c.config = {"rope_parameters": {"rope_theta": 5e6, "rope_type": "default"}, "rms_norm_eps": 1e-5}
    assert c.comfy_overrides() == {"rope_theta": 5e6, "rms_norm_eps": 1e-5}


@pytest.mark.parametrize("key,value", [("hidden_size", 128), ("num_hidden_layers", 5), ("vocab_size", 151936),
                                       ("num_attention_heads", 4)])
def test_config_mismatch(tmp_path, tiny, key, value):
    cfg, sd = tiny
    folder = save_hf_folder(sd, {**cfg, key: value}, tmp_path / "bad")
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_qwen3_checkpoint(folder)
    msg = str(e.value)
    assert f"{key}={value}" in msg and f"{key}={cfg[key]}" in msg and "config.json" in msg


def test_pickle_refused_without_opening(tmp_path, monkeypatch):
    path = tmp_path / "evil.bin"
    path.write_bytes(b"\x80\x04junk that would be unpickled")
    opened = []
    real_open = builtins.open

    def spy_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        p = path.with_suffix(suffix)
        if suffix != ".bin":
            path.rename(p)
            path = p
        with pytest.raises(ck.CheckpointError, match="arbitrary code") as e:
            ck.read_qwen3_checkpoint(p)
        assert str(p) in str(e.value) and "safetensors" in str(e.value)
    assert not any("evil" in o for o in opened)


def test_folder_with_only_pickle(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(ck.CheckpointError, match="pytorch_model.bin.*arbitrary code"):
        ck.read_qwen3_checkpoint(tmp_path / "m")


def test_missing_path_and_shard(tmp_path, tiny):
    cfg, sd = tiny
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.read_qwen3_checkpoint(tmp_path / "nothing.safetensors")
    folder = save_hf_folder(sd, cfg, tmp_path / "sh", shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ck.CheckpointError, match="model-00002-of-00003.safetensors.*missing") as e:
        ck.read_qwen3_checkpoint(folder)
    assert str(folder) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.CheckpointError, match="no model.safetensors"):
        ck.read_qwen3_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("cut", [4, 100, -1000])
def test_truncated(tmp_path, tiny, cut):
    cfg, sd = tiny
    p = save_single_file(sd, tmp_path / "t.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(ck.CheckpointError, match="truncated|corrupt") as e:
        ck.read_qwen3_checkpoint(p)
    assert str(p) in str(e.value)


def test_corrupt_header(tmp_path):
    p = tmp_path / "c.safetensors"
    p.write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 50)
    with pytest.raises(ck.CheckpointError, match="corrupt safetensors header"):
        ck.read_qwen3_checkpoint(p)


def _without(sd, pred):
    return {k: v for k, v in sd.items() if not pred(k)}


def test_structural_errors(tmp_path, tiny):
    cfg, sd = tiny
    cases = {
        "no_qnorm": (_without(sd, lambda k: "q_norm" in k or "k_norm" in k), "not Qwen3"),
        "not_llm": ({"encoder.weight": torch.zeros(2, 2)}, "not a Qwen3 text encoder"),
        "two_layers": (_without(sd, lambda k: k.startswith("model.layers.2.")), "2 layers; at least 3"),
        "gap": (_without(sd, lambda k: k.startswith("model.layers.1.")), r"not contiguous .*\[1\]"),
        "no_norm": (_without(sd, lambda k: k == "model.norm.weight"), "model.norm.weight"),
        "no_mlp": (_without(sd, lambda k: k == "model.layers.2.mlp.up_proj.weight"), "layers.2.mlp.up_proj"),
    }
    for name, (bad, pattern) in cases.items():
        p = save_single_file(bad, tmp_path / f"{name}.safetensors")
        with pytest.raises(ck.CheckpointError, match=pattern) as e:
            ck.read_qwen3_checkpoint(p)
        assert str(p) in str(e.value), name


def test_head_dim_not_128(tmp_path, tiny):
    cfg, sd = tiny
    bad = dict(sd)
    for i in range(3):
        bad[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.zeros(200, 64)
    with pytest.raises(ck.CheckpointError, match="head_dim must be 128.*200 rows"):
        ck.read_qwen3_checkpoint(save_single_file(bad, tmp_path / "hd.safetensors"))


def test_no_copy(tmp_path, tiny, monkeypatch):
    cfg, sd = tiny
    folder = save_hf_folder(sd, cfg, tmp_path / "nc", shards=2, flat=True)
    returned = []
    real = ck.load_file

    def spy(path, *a, **k):
        out = real(path, *a, **k)
        returned.extend(out.values())
        return out

    monkeypatch.setattr(ck, "load_file", spy)
    r = ck.read_qwen3_checkpoint(folder)
    kept = [t for t in returned if t.dim() > 0]
    ids = {id(t) for t in kept}
    assert all(id(t) in ids for t in r.state_dict.values())
    ptrs = {t.data_ptr() for t in kept}
    assert all(t.data_ptr() in ptrs for t in r.state_dict.values())


def test_bf16_kept(tmp_path):
    cfg = tiny_config(layers=3, vocab=500)
    sd = make_state_dict(cfg, dtype=torch.bfloat16)
    r = ck.read_qwen3_checkpoint(save_single_file(sd, tmp_path / "b.safetensors", flat=True))
    assert r.info.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in r.state_dict.values())


def test_fingerprint(tmp_path, tiny):
    cfg, sd = tiny
    a = ck.read_qwen3_checkpoint(save_single_file(sd, tmp_path / "a.safetensors")).fingerprint
    b = ck.read_qwen3_checkpoint(save_single_file(sd, tmp_path / "x" / "a.safetensors")).fingerprint
    assert a == b and len(a) == 16
    sd2 = dict(sd)
    sd2["model.norm.weight"] = sd["model.norm.weight"] + 1
    c = ck.read_qwen3_checkpoint(save_single_file(sd2, tmp_path / "y" / "a.safetensors")).fingerprint
    assert c != a
    f1 = ck.read_qwen3_checkpoint(save_hf_folder(sd, cfg, tmp_path / "f1", shards=2)).fingerprint
    cfg2 = {**cfg, "rope_theta": 5e5}
    f2 = ck.read_qwen3_checkpoint(save_hf_folder(sd, cfg2, tmp_path / "f2", shards=2)).fingerprint
    assert f1 != f2


def test_listing(tmp_path, tiny):
    cfg, sd = tiny
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    save_single_file(sd, d1 / "qwen.safetensors")
    save_single_file(sd, d1 / "sub" / "flat.safetensors", flat=True)
    save_file({"encoder.block.0.weight": torch.zeros(2)}, str(d1 / "t5.safetensors"))
    (d1 / "readme.txt").write_text("x")
    save_hf_folder(sd, cfg, d1 / "hf_sharded", shards=3)
    save_hf_folder(sd, cfg, d2 / "models" / "emb", flat=True)
    save_single_file(sd, d2 / "qwen.safetensors")  # same name in a second dir: listed once
    (d2 / "no_config").mkdir()
    save_single_file(sd, d2 / "no_config" / "model.safetensors")  # plain file in a plain folder
    names = ck.list_model_entries([str(d1), str(d2), str(tmp_path / "absent")])
    assert names == sorted(["qwen.safetensors", "sub/flat.safetensors", "hf_sharded", "models/emb",
                            "no_config/model.safetensors"])
    assert names == ck.list_model_entries([str(d1), str(d2)])
    assert ck.resolve_entry([str(d1), str(d2)], "qwen.safetensors") == str(d1 / "qwen.safetensors")
    assert ck.resolve_entry([str(d1), str(d2)], "models/emb") == str(d2 / "models" / "emb")
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.resolve_entry([str(d1)], "models/emb")
    with pytest.raises(ck.CheckpointError, match="relative"):
        ck.resolve_entry([str(d1)], "../d2/qwen.safetensors")
    r = ck.read_qwen3_checkpoint(ck.resolve_entry([str(d1)], "hf_sharded"))
    assert r.info.layers == 3


def test_mixed_duplicate_keys(tmp_path, tiny):
    cfg, sd = tiny
    both = {**sd, "norm.weight": sd["model.norm.weight"].clone()}
    with pytest.raises(ck.CheckpointError, match="appears twice"):
        ck.read_qwen3_checkpoint(save_single_file(both, tmp_path / "dup.safetensors"))


def test_index_json_is_valid(tmp_path, tiny):
    cfg, sd = tiny
    folder = save_hf_folder(sd, cfg, tmp_path / "ix", shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)


def test_fingerprint_path_matches_reader(tmp_path, tiny):
    cfg, sd = tiny
    for p in (save_single_file(sd, tmp_path / "s.safetensors"), save_hf_folder(sd, cfg, tmp_path / "f", shards=2)):
        assert ck.fingerprint_path(p) == ck.read_qwen3_checkpoint(p).fingerprint
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.fingerprint_path(tmp_path / "gone.safetensors")


def test_unusable_entries_are_listed_and_explain_themselves(tmp_path, tiny):
    cfg, sd = tiny
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "only_bin").mkdir()
    (tmp_path / "only_bin" / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "encoder.bin").write_bytes(b"\x80\x02}q\x00.")
    names = ck.list_model_entries([str(tmp_path)])
    assert names == ["encoder.bin", "only_bin", "only_config"]
    for name, message in (("encoder.bin", "pickle"), ("only_bin", "pickle"), ("only_config", "no model.safetensors")):
        with pytest.raises(ck.CheckpointError, match=message):
            ck.read_qwen3_checkpoint(ck.resolve_entry([str(tmp_path)], name))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/outside.safetensors", "sub/../../x.safetensors"])
def test_shard_index_cannot_leave_the_folder(tmp_path, tiny, shard):
    cfg, sd = tiny
    folder = save_hf_folder(sd, cfg, tmp_path / "m", shards=2)
    save_single_file(sd, tmp_path / "outside.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ck.CheckpointError, match="outside the model folder"):
        ck.read_qwen3_checkpoint(folder)
    with pytest.raises(ck.CheckpointError, match="outside the model folder"):
        ck.fingerprint_path(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tiny, bad):
    cfg, sd = tiny
    broken = dict(sd)
    key = "model.layers.1.mlp.up_proj.weight"
    broken[key] = sd[key].clone()
    broken[key][0, :3] = bad
    with pytest.raises(ck.CheckpointError, match=r"up_proj.weight' has 3 NaN/Inf values"):
        ck.read_qwen3_checkpoint(save_single_file(broken, tmp_path / "nan.safetensors"))


def test_quantized_weights_are_refused_naming_the_dtype(tmp_path, tiny):
    cfg, sd = tiny
    q = dict(sd)
    key = "model.layers.0.self_attn.q_proj.weight"
    q[key] = sd[key].to(torch.float8_e4m3fn)
    q[key.replace(".weight", ".scale_weight")] = torch.ones(())
    with pytest.raises(ck.CheckpointError, match=r"q_proj.weight' is stored as F8_E4M3 .*stock Load CLIP"):
        ck.read_qwen3_checkpoint(save_single_file(q, tmp_path / "fp8.safetensors"))


def test_qwen3vl_layout_is_named(tmp_path, tiny):
    cfg, sd = tiny
    vl = {"model.language_model." + k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    with pytest.raises(ck.CheckpointError, match="a Qwen3-VL checkpoint .*Hidden Layer Select"):
        ck.read_qwen3_checkpoint(save_single_file(vl, tmp_path / "vl.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_non_finite_detection_per_dtype_against_isfinite(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5000, generator=g) * 1e3).to(dtype)
    assert not ck._has_non_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
        y = x.clone()
        y[4321] = bad
        assert ck._has_non_finite(y) == (not bool(torch.isfinite(y).all())) == True  # noqa: E712
    big = torch.full((10,), torch.finfo(dtype).max, dtype=dtype)  # the largest finite values stay finite
    assert not ck._has_non_finite(big) and not ck._has_non_finite(-big)
