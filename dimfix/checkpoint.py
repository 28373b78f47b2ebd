"""Qwen3 checkpoint reader: single ``.safetensors`` files and Hugging Face model folders.

Accepted layouts (all give the same result):

- one file in ComfyUI layout (``model.embed_tokens.weight``, ``model.layers.{i}.…``, ``model.norm.weight``),
- one file in the flat Qwen3-Embedding layout (``embed_tokens.weight``, ``layers.{i}.…``, ``norm.weight``),
- an HF folder with ``config.json`` and ``model.safetensors``,
- an HF folder with ``config.json``, ``model.safetensors.index.json`` and its shards.

The result is always in ComfyUI layout; ``lm_head.*`` is dropped. Tensors are the very objects that
safetensors returned (re-keyed, never cloned), so a checkpoint costs one copy of its weights.
Pickle formats (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) are refused without being opened: unpickling
can execute arbitrary code.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from .safetensors_header import read_header
from .tokens import ZIMAGE_WIDTH

__all__ = [
    "CheckpointError", "Qwen3Info", "Qwen3Checkpoint", "QWEN3_4B_DEFAULTS", "HEAD_DIM", "MIN_LAYERS",
    "read_qwen3_checkpoint", "checkpoint_fingerprint", "fingerprint_path", "list_model_entries", "resolve_entry",
]

HEAD_DIM = 128
#: ComfyUI's Qwen3 text-encoder wrapper asserts ``|layer_idx| < num_layers`` with layer_idx = -2.
MIN_LAYERS = 3
#: ComfyUI ``Qwen3_4BConfig`` defaults (the fields a loader may override).
QWEN3_4B_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": ZIMAGE_WIDTH,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_LAYER_PARTS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_FLAT_ROOTS = ("embed_tokens.", "layers.", "norm.")
#: Bytes of tensor data (from the start and from the end) mixed into a file fingerprint.
_FINGERPRINT_SAMPLE = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be read as a Qwen3 text encoder. The message names the file and the problem."""


@dataclass(frozen=True)
class Qwen3Info:
    """Architecture read from the tensor shapes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype: torch.dtype
    has_q_norm: bool


@dataclass
class Qwen3Checkpoint:
    """A Qwen3 checkpoint in ComfyUI key layout."""

    state_dict: dict[str, torch.Tensor]
    info: Qwen3Info
    source_files: list[str]
    fingerprint: str
    config: dict[str, Any] | None = None
    dropped_keys: list[str] = field(default_factory=list)

    def comfy_overrides(self) -> dict[str, Any]:
        """Overrides for ComfyUI's ``qwen3_4b_model_config``: only values that differ from Qwen3-4B."""
        i = self.info
        values: dict[str, Any] = {
            "vocab_size": i.vocab, "hidden_size": i.hidden, "intermediate_size": i.intermediate,
            "num_hidden_layers": i.layers, "num_attention_heads": i.heads, "num_key_value_heads": i.kv_heads,
        }
        cfg = self.config or {}
        rope_theta = _config_rope_theta(cfg)
        if rope_theta is not None:
            values["rope_theta"] = float(rope_theta)
        if cfg.get("rms_norm_eps") is not None:
            values["rms_norm_eps"] = float(cfg["rms_norm_eps"])
        if cfg.get("max_position_embeddings") is not None:
            values["max_position_embeddings"] = int(cfg["max_position_embeddings"])
        return {k: v for k, v in values.items() if v != QWEN3_4B_DEFAULTS[k]}


def _config_rope_theta(cfg: dict[str, Any]) -> float | None:
    if cfg.get("rope_theta") is not None:
        return cfg["rope_theta"]
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return params["rope_theta"]
    return None


# ----------------------------------------------------------------------------------------- headers

def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header. Returns (header, header_length)."""
    try:
        with open(path, "rb") as f:
            return read_header(f, path.stat().st_size, str(path), CheckpointError)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e})") from e


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
    """Feed size, header and a sample of the data (first and last MiB) of one file into ``h``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h.update(str(size).encode())
        h.update(f.read(n))
        h.update(f.read(_FINGERPRINT_SAMPLE))
        data_len = size - 8 - n
        if data_len > _FINGERPRINT_SAMPLE:
            f.seek(max(8 + n + _FINGERPRINT_SAMPLE, size - _FINGERPRINT_SAMPLE))
            h.update(f.read(_FINGERPRINT_SAMPLE))


def checkpoint_fingerprint(files: list[Path], extra: list[Path] = ()) -> str:
    """Short, cheap content fingerprint (16 hex digits of sha256).

    Per file: its name, size, safetensors header and the first and last MiB of tensor data — never the
    whole file, so it costs milliseconds for multi-GB checkpoints. ``extra`` files (``config.json``, the
    shard index) are hashed whole. An edit that changes neither header, size nor the sampled bytes is not
    detected.
    """
    h = hashlib.sha256()
    for p in extra:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for p in files:
        h.update(p.name.encode())
        _file_digest(p, h)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- reading

def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing to load a pickle checkpoint ({path.suffix}): unpickling can execute arbitrary "
            "code. Convert it to .safetensors (e.g. with transformers' save_pretrained(safe_serialization=True)) "
            "and load that instead.")


def _model_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(weight files, extra files to fingerprint) of an HF folder."""
    index = folder / INDEX_NAME
    config = folder / "config.json"
    extra = [config] if config.is_file() else []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt shard index ({e})") from e
        names = sorted(set(weight_map.values()))
        root = folder.resolve()
        for name in names:
            if not isinstance(name, str) or root not in (root / name).resolve().parents:
                raise CheckpointError(f"{index}: shard {name!r} is outside the model folder {folder}; only files "
                                      "inside the folder the model was chosen from are read")
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder}: shard {name!r} named in {INDEX_NAME} is missing")
        return [folder / n for n in names], [index, *extra]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME], extra
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}); refusing to load them: unpickling can "
            "execute arbitrary code. Convert the model to .safetensors and load that instead.")
    raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} in this folder; download the model's "
                          "*.safetensors weight files (and the index, if sharded) into it")


def _remap(raw: dict[str, torch.Tensor], where: str, out: dict[str, torch.Tensor], dropped: list[str]) -> None:
    """Re-key ``raw`` into ComfyUI layout (same tensor objects)."""
    for key, tensor in raw.items():
        if key.startswith("lm_head."):
            dropped.append(key)
            continue
        if key.startswith("model."):
            new = key
        elif key.startswith(_FLAT_ROOTS):
            new = "model." + key
        else:
            dropped.append(key)
            continue
        if new in out:
            raise CheckpointError(f"{where}: tensor {new!r} appears twice (both flat and 'model.'-prefixed keys?)")
        out[new] = tensor


def _shape(sd: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _inspect(sd: dict[str, torch.Tensor], where: str) -> Qwen3Info:
    if "model.language_model.layers.0.self_attn.q_proj.weight" in sd:
        raise CheckpointError(
            f"{where}: a Qwen3-VL checkpoint (model.language_model.* tensors), not a Qwen3 text encoder: on ComfyUI "
            "0.26 or newer load it with the stock Load CLIP node (type lumina2), then choose its layer with Hidden "
            "Layer Select (-6 is the usual choice); older ComfyUI cannot load Qwen3-VL as a CLIP")
    if "model.layers.0.self_attn.q_proj.weight" not in sd or "model.embed_tokens.weight" not in sd:
        raise CheckpointError(
            f"{where}: not a Qwen3 text encoder (no 'layers.0.self_attn.q_proj.weight' / 'embed_tokens.weight' "
            "tensors, with or without the 'model.' prefix)")
    has_q_norm = "model.layers.0.self_attn.q_norm.weight" in sd and "model.layers.0.self_attn.k_norm.weight" in sd
    if not has_q_norm:
        raise CheckpointError(
            f"{where}: no self_attn.q_norm/k_norm weights: this is a Qwen2/Qwen2.5/Llama-style model, not Qwen3")
    indices = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
    n = len(indices)
    if indices != list(range(n)):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise CheckpointError(f"{where}: layer indices are not contiguous from 0 (missing layers {missing})")
    if n < MIN_LAYERS:
        raise CheckpointError(f"{where}: {n} layers; at least {MIN_LAYERS} are needed (ComfyUI uses layer -2)")
    for i in range(n):
        for part in _LAYER_PARTS:
            if f"model.layers.{i}.{part}" not in sd:
                raise CheckpointError(f"{where}: tensor 'model.layers.{i}.{part}' is missing")
    if "model.norm.weight" not in sd:
        raise CheckpointError(f"{where}: tensor 'model.norm.weight' (final norm) is missing")
    vocab, hidden = _shape(sd, "model.embed_tokens.weight")
    q_rows = _shape(sd, "model.layers.0.self_attn.q_proj.weight")[0]
    k_rows = _shape(sd, "model.layers.0.self_attn.k_proj.weight")[0]
    q_norm = _shape(sd, "model.layers.0.self_attn.q_norm.weight")[0]
    if q_rows % HEAD_DIM or k_rows % HEAD_DIM or q_norm != HEAD_DIM:
        raise CheckpointError(
            f"{where}: head_dim must be {HEAD_DIM} (ComfyUI's Qwen3 fixes it), but q_proj has {q_rows} rows, "
            f"k_proj {k_rows} rows and q_norm {q_norm} entries")
    intermediate = _shape(sd, "model.layers.0.mlp.gate_proj.weight")[0]
    return Qwen3Info(hidden=hidden, layers=n, heads=q_rows // HEAD_DIM, kv_heads=k_rows // HEAD_DIM,
                     head_dim=HEAD_DIM, intermediate=intermediate, vocab=vocab,
                     dtype=sd["model.norm.weight"].dtype, has_q_norm=has_q_norm)


#: safetensors dtypes of weights the loader reads (quantized formats are left to ComfyUI's own loader).
PLAIN_DTYPES = ("BF16", "F16", "F32", "F64")


def _check_dtypes(path: Path, header: dict[str, Any]) -> None:
    for key, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if key != "__metadata__" and dtype not in PLAIN_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r} is stored as {dtype} (a quantized checkpoint, e.g. *_fp8_mixed); this loader "
                "reads bf16/fp16/fp32 weights. Load quantized files with the stock Load CLIP node (type lumina2) -- "
                "the Dimension Analyzer accepts that CLIP -- or use a bf16 copy of the model here.")


def _has_non_finite(t: torch.Tensor) -> bool:
    """Any NaN/Inf in ``t`` (non-empty): min and max in one read, no temporary; NaN propagates through both."""
    lo, hi = torch.aminmax(t.reshape(-1))
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and _has_non_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {key!r} has {bad} NaN/Inf values of {t.numel()}; the file is "
                                  "corrupt or was saved after a failed conversion. Download or convert it again.")


def _cross_check(info: Qwen3Info, cfg: dict[str, Any], config_path: Path) -> None:
    pairs = (("hidden_size", info.hidden), ("num_hidden_layers", info.layers), ("vocab_size", info.vocab),
             ("num_attention_heads", info.heads), ("num_key_value_heads", info.kv_heads),
             ("intermediate_size", info.intermediate), ("head_dim", info.head_dim))
    for key, actual in pairs:
        if key in cfg and cfg[key] is not None and int(cfg[key]) != actual:
            raise CheckpointError(
                f"{config_path}: config.json says {key}={cfg[key]} but the weights have {key}={actual}; "
                "the config and the safetensors files do not belong together")


def read_qwen3_checkpoint(path: str | os.PathLike,
                          on_file: Callable[[int, int], None] | None = None) -> Qwen3Checkpoint:
    """Read a Qwen3 checkpoint (single ``.safetensors`` file or HF folder) into ComfyUI layout.

    Raises ``CheckpointError`` naming the file and the problem for anything that is not a readable
    Qwen3 safetensors checkpoint. ``on_file(done, total)`` is called before each weight file and once
    after the last (``done == total``): for a progress bar, and it may raise to stop reading (Interrupt).
    """
    p = Path(path)
    _refuse_pickle(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    cfg: dict[str, Any] | None = None
    config_path = p / "config.json"
    if p.is_dir():
        files, extra = _model_files(p)
        if config_path.is_file():
            try:
                cfg = json.loads(config_path.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{config_path}: unreadable config.json ({e})") from e
    else:
        if p.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{p}: unsupported file type {p.suffix!r}; expected a .safetensors file or an HF "
                                  "folder")
        files, extra = [p], []

    sd: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for i, f in enumerate(files):
        if on_file is not None:
            on_file(i, len(files))
        _check_dtypes(f, _read_header(f)[0])
        try:
            raw = load_file(str(f))
        except Exception as e:  # safetensors raises its own SafetensorError / OSError types
            raise CheckpointError(f"{f}: cannot read safetensors file ({type(e).__name__}: {e})") from e
        _check_finite(f, raw)
        _remap(raw, str(f), sd, dropped)
        del raw
    if on_file is not None:
        on_file(len(files), len(files))
    where = str(p)
    info = _inspect(sd, where)
    if cfg is not None:
        _cross_check(info, cfg, config_path)
    return Qwen3Checkpoint(state_dict=sd, info=info, source_files=[str(f) for f in files],
                           fingerprint=checkpoint_fingerprint(files, extra), config=cfg, dropped_keys=dropped)


def fingerprint_path(path: str | os.PathLike) -> str:
    """The ``fingerprint`` that ``read_qwen3_checkpoint(path)`` would report, without loading tensors.

    Costs a few file reads (headers and data samples), so it suits ComfyUI's per-prompt change check.
    Raises ``CheckpointError`` like the reader for missing or pickle paths.
    """
    p = Path(path)
    _refuse_pickle(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    files, extra = _model_files(p) if p.is_dir() else ([p], [])
    for f in files:
        _read_header(f)
    return checkpoint_fingerprint(files, extra)


# ----------------------------------------------------------------------------------------- listing

def _is_hf_folder(folder: Path, names: list[str]) -> bool:
    """A model folder, usable or not: unusable ones (only config.json, only pickle weights) are listed too, so
    that choosing one explains what is missing instead of the folder silently not appearing."""
    return INDEX_NAME in names or "config.json" in names or \
        any(n.startswith("pytorch_model") and n.endswith(PICKLE_SUFFIXES) for n in names)


_HEADER_CACHE: dict[tuple[str, int, int], bool] = {}


def _looks_like_text_encoder(path: Path) -> bool:
    """A decoder-LLM text encoder (has ``layers.0.self_attn.q_proj.weight``). Unreadable files count as
    candidates so that choosing them explains the problem instead of hiding the file."""
    try:
        st = path.stat()
    except OSError:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HEADER_CACHE:
        try:
            header, _ = _read_header(path)
            _HEADER_CACHE[key] = any(k.endswith("layers.0.self_attn.q_proj.weight") for k in header)
        except CheckpointError:
            _HEADER_CACHE[key] = True
    return _HEADER_CACHE[key]


def list_model_entries(dirs: list[str]) -> list[str]:
    """Names (relative to one of ``dirs``) of loadable text encoders: single ``.safetensors`` files that
    look like decoder-LLM text encoders and HF model folders (each folder once, never its shards).
    Sorted, without duplicates."""
    entries: set[str] = set()
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            dirnames.sort()
            if here != root and _is_hf_folder(here, filenames):
                entries.add(os.path.relpath(here, root))
                dirnames[:] = []
                continue
            for name in filenames:
                low = name.lower()
                if (low.endswith(".safetensors") and _looks_like_text_encoder(here / name)) or \
                        low.endswith(PICKLE_SUFFIXES):  # listed so that choosing it says "convert to safetensors"
                    entries.add(os.path.relpath(here / name, root))
    return sorted(entries)


def resolve_entry(dirs: list[str], name: str) -> str:
    """Full path of an entry returned by ``list_model_entries`` (first matching directory wins)."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{name!r}: model names must be relative to the text_encoders folders")
    for d in dirs:
        candidate = Path(d) / rel
        if candidate.exists():
            return str(candidate)
    raise CheckpointError(f"{name!r}: not found in the text_encoders folders ({', '.join(map(str, dirs))})")
