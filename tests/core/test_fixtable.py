"""Fix-table format: round trip, validation errors, atomic and non-clobbering writes."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from dimfix import fixtable
from dimfix.config import Thresholds
from dimfix.fixtable import FixTable, FixTableError, FixTableMeta, load_fix_table, save_fix_table

D = 8


def make_table(d: int = D, seed: int = 0, extras: bool = True) -> FixTable:
    g = torch.Generator().manual_seed(seed)
    ex = {}
    if extras:
        for side in ("reference", "target"):
            base = torch.randn(d, generator=g)
            for i, q in enumerate((0.1, 1, 50, 99, 99.9)):
                ex[fixtable.percentile_name(side, q)] = base + i
        ex["adapter_weight"] = torch.randn(d, d, generator=g)
        ex["adapter_bias"] = torch.randn(d, generator=g)
    meta = FixTableMeta(reference_model="Qwen3-4B@sha256:0123456789ab", target_model="Qwen3-Embedding-4B@sha256:ba98",
                        layer=-6, template="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                        token_scope="content", prompt_count=86, token_count=1234, created="2026-01-02T03:04:05Z",
                        thresholds=Thresholds(outlier_ratio=10.0, dead_rel=2e-3))
    return FixTable(torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.1, torch.randn(d, generator=g),
                    torch.rand(d, generator=g) * 3 + 0.1, extras=ex, meta=meta)


def write_raw(path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def test_round_trip_is_bit_exact(tmp_path):
    t = make_table()
    path = save_fix_table(t, tmp_path / "t.safetensors")
    u = load_fix_table(path)
    for name, tensor in t.tensors().items():
        assert torch.equal(u.tensors()[name], tensor), name
        assert u.tensors()[name].dtype == torch.float32
    assert set(u.tensors()) == set(t.tensors())
    assert u.meta == t.meta
    assert u.dim == D
    assert u.meta.thresholds.outlier_ratio == 10.0 and u.meta.layer == -6


def test_metadata_strings_on_disk(tmp_path):
    from safetensors import safe_open

    path = save_fix_table(make_table(), tmp_path / "t.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "zimage-dimfix.fix-table"
    assert meta["version"] == "1.1" == fixtable.VERSION
    assert meta["reference_layer"] == "-6"  # not given: the same as 'layer'
    assert meta["layer"] == "-6" and meta["prompt_count"] == "86" and meta["token_count"] == "1234"
    assert json.loads(meta["thresholds"])["outlier_ratio"] == 10.0


def test_sweep_layer_and_percentile_accessor(tmp_path):
    t = make_table(extras=False)
    t.meta.layer = "sweep"
    t.extras["reference_p99_9"] = torch.arange(D, dtype=torch.float32)
    u = load_fix_table(save_fix_table(t, tmp_path / "s.safetensors"))
    assert u.meta.layer == "sweep"
    assert torch.equal(u.percentile("reference", 99.9), torch.arange(D, dtype=torch.float32))
    assert u.percentile("reference", 0.1) is None
    assert u.percentile("target", 99.9) is None
    with pytest.raises(ValueError, match="percentile"):
        u.percentile("reference", 42)


def test_float64_and_numpy_inputs_become_float32():
    t = FixTable(torch.zeros(3, dtype=torch.float64), torch.ones(3).numpy(), torch.zeros(3), torch.ones(3))
    assert all(v.dtype == torch.float32 for v in t.tensors().values())


@pytest.mark.parametrize("field,value,match", [
    ("target_std", torch.ones(D + 1), r"'target_std' has shape \(9,\)"),
    ("reference_std", torch.tensor([1.0, float("nan"), 1, 1, 1, 1, float("inf"), 1]), r"'reference_std' has 1 NaN and 1 Inf"),
    ("target_std", -torch.ones(D), r"'target_std' has 8 negative"),
])
def test_save_validates(tmp_path, field, value, match):
    t = make_table()
    setattr(t, field, value)
    with pytest.raises(FixTableError, match=match):
        save_fix_table(t, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_wrong_shape_and_nan(tmp_path):
    base = {n: torch.ones(D) for n in fixtable.REQUIRED_TENSORS}
    meta = {"format": fixtable.FORMAT, "version": "1"}
    write_raw(tmp_path / "shape.safetensors", {**base, "target_mean": torch.ones(D, 2)}, meta)
    with pytest.raises(FixTableError, match=r"shape.safetensors.*'target_mean' has shape \(8, 2\)"):
        load_fix_table(tmp_path / "shape.safetensors")
    nan = torch.ones(D)
    nan[[1, 3]] = float("nan")
    write_raw(tmp_path / "nan.safetensors", {**base, "target_mean": nan}, meta)
    with pytest.raises(FixTableError, match=r"nan.safetensors.*'target_mean' has 2 NaN and 0 Inf"):
        load_fix_table(tmp_path / "nan.safetensors")
    write_raw(tmp_path / "dtype.safetensors", {**base, "target_mean": torch.ones(D, dtype=torch.float64)}, meta)
    with pytest.raises(FixTableError, match="'target_mean' has dtype torch.float64"):
        load_fix_table(tmp_path / "dtype.safetensors")
    missing = dict(base)
    del missing["reference_std"]
    write_raw(tmp_path / "missing.safetensors", missing, meta)
    with pytest.raises(FixTableError, match="missing: reference_std"):
        load_fix_table(tmp_path / "missing.safetensors")


def test_load_rejects_unknown_format_and_newer_version(tmp_path):
    base = {n: torch.ones(D) for n in fixtable.REQUIRED_TENSORS}
    write_raw(tmp_path / "fmt.safetensors", base, {"format": "pt"})
    with pytest.raises(FixTableError, match=r"fmt.safetensors: unknown format 'pt'"):
        load_fix_table(tmp_path / "fmt.safetensors")
    write_raw(tmp_path / "nometa.safetensors", base, None)
    with pytest.raises(FixTableError, match="unknown format None"):
        load_fix_table(tmp_path / "nometa.safetensors")
    write_raw(tmp_path / "v2.safetensors", base, {"format": fixtable.FORMAT, "version": "2.0"})
    with pytest.raises(FixTableError, match="version 2.0 is newer"):
        load_fix_table(tmp_path / "v2.safetensors")
    write_raw(tmp_path / "v1_3.safetensors", base, {"format": fixtable.FORMAT, "version": "1.3"})
    assert load_fix_table(tmp_path / "v1_3.safetensors").dim == D  # newer minor is readable


def test_load_rejects_truncated_and_foreign_files(tmp_path):
    path = save_fix_table(make_table(), tmp_path / "t.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-50])
    with pytest.raises(FixTableError, match=r"trunc.safetensors: file is truncated"):
        load_fix_table(tmp_path / "trunc.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:20])
    with pytest.raises(FixTableError, match=r"head.safetensors: not a safetensors file or truncated"):
        load_fix_table(tmp_path / "head.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, this is not a fix table at all")
    with pytest.raises(FixTableError, match=r"text.safetensors: not a safetensors file"):
        load_fix_table(tmp_path / "text.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(FixTableError, match="only 3 bytes"):
        load_fix_table(tmp_path / "tiny.safetensors")
    header = b'{"a": [1, 2'
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FixTableError, match="header is not JSON"):
        load_fix_table(tmp_path / "json.safetensors")
    with pytest.raises(FixTableError, match="absent.safetensors: cannot read file"):
        load_fix_table(tmp_path / "absent.safetensors")


def test_refuses_overwrite_unless_allowed(tmp_path):
    path = save_fix_table(make_table(seed=1), tmp_path / "t.safetensors")
    before = path.read_bytes()
    with pytest.raises(FixTableError, match=r"t.safetensors already exists; pass overwrite=True"):
        save_fix_table(make_table(seed=2), path)
    assert path.read_bytes() == before
    save_fix_table(make_table(seed=2), path, overwrite=True)
    assert torch.equal(load_fix_table(path).target_std, make_table(seed=2).target_std)


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    existing = save_fix_table(make_table(seed=1), tmp_path / "keep.safetensors")
    before = existing.read_bytes()

    def broken_writer(fh, data):
        fh.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fixtable, "_write_bytes", broken_writer)
    with pytest.raises(OSError, match="simulated"):
        save_fix_table(make_table(seed=3), tmp_path / "new.safetensors")
    with pytest.raises(OSError, match="simulated"):
        save_fix_table(make_table(seed=3), existing, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    assert existing.read_bytes() == before


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FixTableError, match="does not exist"):
        save_fix_table(make_table(), tmp_path / "nope" / "t.safetensors")



def test_reference_layer_round_trip_and_default():
    assert FixTableMeta().reference_layer == -2
    assert FixTableMeta(layer=-6).reference_layer == -6
    assert FixTableMeta(layer=-6, reference_layer=-2).reference_layer == -2
    assert "reference_layer" in fixtable.META_KEYS


def test_reference_layer_differs_from_target_layer_on_disk(tmp_path):
    from safetensors import safe_open

    t = make_table()
    t.meta.reference_layer = -2  # a VL target at -6 paired with the reference at -2
    path = save_fix_table(t, tmp_path / "vl.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert (meta["layer"], meta["reference_layer"]) == ("-6", "-2")
    u = load_fix_table(path)
    assert (u.meta.layer, u.meta.reference_layer) == (-6, -2)
    assert u.meta == t.meta


def test_older_table_without_reference_layer_reads_it_as_layer(tmp_path):
    base = {n: torch.ones(D) for n in fixtable.REQUIRED_TENSORS}
    write_raw(tmp_path / "old.safetensors", base, {"format": fixtable.FORMAT, "version": "1", "layer": "-6"})
    old = load_fix_table(tmp_path / "old.safetensors")
    assert (old.meta.layer, old.meta.reference_layer) == (-6, -6)
    write_raw(tmp_path / "sweep.safetensors", base, {"format": fixtable.FORMAT, "version": "1", "layer": "sweep"})
    assert load_fix_table(tmp_path / "sweep.safetensors").meta.reference_layer == "sweep"


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_older_metadata_names_are_read_as_their_one_name(tmp_path, version):
    base = {n: torch.ones(D) for n in fixtable.REQUIRED_TENSORS}
    old_thresholds = json.dumps({"outlier_ratio": 4.0, "hyper_multiplier": 7.5, "dead_threshold": 0.02})
    write_raw(tmp_path / "old.safetensors", base, {"format": fixtable.FORMAT, "version": version, "layer": "-2",
                                                   "scope": "no_sink", "thresholds": old_thresholds})
    meta = load_fix_table(tmp_path / "old.safetensors").meta
    assert meta.token_scope == "no_sink"
    assert (meta.thresholds.outlier_ratio, meta.thresholds.hyper_mult, meta.thresholds.dead_abs) == (4.0, 7.5, 0.02)


@pytest.mark.parametrize("bad", ["last", True, 2.5, "sweep"])
def test_invalid_reference_layer_metadata(tmp_path, bad):
    t = make_table()  # layer -6: 'sweep' is only accepted for a sweep table
    t.meta.reference_layer = bad
    with pytest.raises(FixTableError, match=r"'reference_layer' must be an int HF index \(e.g. -2\), got "):
        save_fix_table(t, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
    base = {n: torch.ones(D) for n in fixtable.REQUIRED_TENSORS}
    write_raw(tmp_path / "r.safetensors", base, {"format": fixtable.FORMAT, "version": "1.1", "layer": "-6",
                                                 "reference_layer": "last"})
    with pytest.raises(FixTableError, match=r"r.safetensors.*'reference_layer' must be an int HF index"):
        load_fix_table(tmp_path / "r.safetensors")


def test_invalid_layer_metadata(tmp_path):
    t = make_table()
    t.meta.layer = "last"
    with pytest.raises(FixTableError, match="'layer' must be an int HF index or 'sweep', got 'last'"):
        save_fix_table(t, tmp_path / "t.safetensors")
