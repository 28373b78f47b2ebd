"""Tiny random Z-Image models for host-tier and server tests.

Everything here is test-only. The files are random weights in the exact key layouts ComfyUI loads:

- :func:`make_tiny_dit_state_dict` — a Z-Image-architecture DiT (ComfyUI's NextDiT with Z-Image
  modulation and pad tokens) in ComfyUI key layout: ``x_pad_token``, ``cap_pad_token``, ``x_embedder``,
  ``noise_refiner.{0,1}``, ``context_refiner.{0,1}``, ``t_embedder``, ``cap_embedder.0`` (RMSNorm gain)
  / ``cap_embedder.1`` (Linear ``cap_feat_dim → dim``), ``layers.N``, ``final_layer``.
- :func:`make_tiny_taesd16_state_dict` — a 16-channel TAESD VAE (detected by ``taesd_decoder.1.weight``).
- :func:`install_tiny_detection_patch` — ComfyUI's stock detection gives Z-Image parameters only to
  ``dim == 3840`` DiTs and builds text encoders only for width-2560 Qwen3 files. The patch (a context
  manager with ``uninstall()``) makes a tiny DiT with pad tokens load as Z-Image and a tiny Qwen3 file
  load through the stock ``CLIPLoader``. It is never part of the pack.
- :func:`write_tiny_models` — writes the files a ``models/`` folder needs for the bundled workflows.
- :func:`zimage_cap_embedder` — ``(gain, W, b, eps)`` of a loaded MODEL's caption embedder.

This module imports ``torch`` and ``safetensors`` only; ComfyUI modules are passed in (or imported
lazily inside the functions that patch ComfyUI), so the module imports without ComfyUI.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from . import tiny_qwen3

__all__ = [
    "DIT_DIM", "DIT_HEADS", "DIT_LAYERS", "CAP_FEAT_DIM", "HEAD_DIM", "ZIMAGE_AXES_DIMS",
    "TINY_DIT_FILE", "TINY_VAE_FILE", "TINY_TE_FILE", "TINY_SUBSTITUTE_DIR", "TinyModels",
    "make_tiny_dit_state_dict", "tiny_dit_config", "make_tiny_taesd16_state_dict",
    "TinyDetectionPatch", "install_tiny_detection_patch", "tiny_qwen3_config_from_state_dict",
    "write_tiny_models", "zimage_cap_embedder", "save_safetensors", "install_test_patch_node",
    "PATCH_NODE_DIR", "tiny_qwen3vl_state_dict", "tiny_qwen3vl_config_from_state_dict",
]

DIT_DIM = 256
DIT_HEADS = 2
DIT_LAYERS = 2
CAP_FEAT_DIM = 64
HEAD_DIM = 128
#: RoPE axes of Z-Image (sum = head width 128); kept for tiny DiTs so dim must be heads × 128.
ZIMAGE_AXES_DIMS = (32, 48, 48)
_REFINER_LAYERS = 2  # fixed in ComfyUI's detection
_PATCH = 2
_IN_CHANNELS = 16
_FREQ_DIM = 256  # timestep frequency embedding width

TINY_DIT_FILE = "tiny_zimage.safetensors"          # in models/diffusion_models
TINY_VAE_FILE = "tiny_taesd16.safetensors"         # in models/vae
TINY_TE_FILE = "tiny_qwen3.safetensors"            # in models/text_encoders (Qwen3-4B layout, ComfyUI keys)
TINY_SUBSTITUTE_DIR = "tiny_qwen3_embedding"       # in models/text_encoders (HF folder, flat keys)

# Tiny text encoder (Qwen3 layout): width = CAP_FEAT_DIM, 1 query / 1 key-value head of width 128.
TE_LAYERS = 8  # deep enough for the shipped layer-select workflow (HF layer -6)
TE_INTERMEDIATE = 128
TE_VOCAB = 151936
SUBSTITUTE_VOCAB = 151665


# ----------------------------------------------------------------------------------------- DiT
def _ffn_hidden(dim: int, multiplier: float = 8.0 / 3.0, multiple_of: int = 256) -> int:
    hidden = int(multiplier * dim)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def tiny_dit_config(dim: int = DIT_DIM, heads: int = DIT_HEADS, layers: int = DIT_LAYERS,
                    cap_feat_dim: int = CAP_FEAT_DIM) -> dict:
    """The NextDiT constructor arguments ComfyUI uses for a Z-Image DiT of these (tiny) sizes."""
    _check_dit_dims(dim, heads)
    return {"image_model": "lumina2", "patch_size": _PATCH, "in_channels": _IN_CHANNELS, "dim": dim,
            "cap_feat_dim": cap_feat_dim, "n_layers": layers, "qk_norm": True, "n_heads": heads,
            "n_kv_heads": heads, "axes_dims": list(ZIMAGE_AXES_DIMS), "axes_lens": [1536, 512, 512],
            "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
            "time_scale": 1000.0, "pad_tokens_multiple": 32}


def _check_dit_dims(dim: int, heads: int) -> None:
    if heads < 1 or dim != heads * HEAD_DIM:
        raise ValueError(f"tiny DiT: dim must equal heads × {HEAD_DIM} (Z-Image RoPE axes {ZIMAGE_AXES_DIMS}); "
                         f"got dim={dim}, heads={heads}")
    if dim < 256:
        raise ValueError(f"tiny DiT: dim must be >= 256 (the timestep embedding feeding adaLN is 256 wide), "
                         f"got {dim}")


def _dit_shapes(dim: int, layers: int, cap_feat_dim: int) -> dict[str, tuple[int, ...]]:
    """Key → shape of a Z-Image NextDiT (heads × 128 = dim, pad tokens, Z-Image modulation)."""
    ffn = _ffn_hidden(dim)
    mod = min(dim, 256)
    shapes: dict[str, tuple[int, ...]] = {
        "x_pad_token": (1, dim), "cap_pad_token": (1, dim),
        "x_embedder.weight": (dim, _PATCH * _PATCH * _IN_CHANNELS), "x_embedder.bias": (dim,),
    }

    def block(prefix: str, modulated: bool) -> None:
        shapes.update({
            f"{prefix}.attention.qkv.weight": (3 * dim, dim), f"{prefix}.attention.out.weight": (dim, dim),
            f"{prefix}.attention.q_norm.weight": (HEAD_DIM,), f"{prefix}.attention.k_norm.weight": (HEAD_DIM,),
            f"{prefix}.feed_forward.w1.weight": (ffn, dim), f"{prefix}.feed_forward.w2.weight": (dim, ffn),
            f"{prefix}.feed_forward.w3.weight": (ffn, dim),
        })
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            shapes[f"{prefix}.{norm}.weight"] = (dim,)
        if modulated:
            shapes[f"{prefix}.adaLN_modulation.0.weight"] = (4 * dim, mod)
            shapes[f"{prefix}.adaLN_modulation.0.bias"] = (4 * dim,)

    for i in range(_REFINER_LAYERS):
        block(f"noise_refiner.{i}", True)
    for i in range(_REFINER_LAYERS):
        block(f"context_refiner.{i}", False)
    t_hidden = min(dim, 1024)
    shapes.update({"t_embedder.mlp.0.weight": (t_hidden, _FREQ_DIM), "t_embedder.mlp.0.bias": (t_hidden,),
                   "t_embedder.mlp.2.weight": (256, t_hidden), "t_embedder.mlp.2.bias": (256,),
                   "cap_embedder.0.weight": (cap_feat_dim,), "cap_embedder.1.weight": (dim, cap_feat_dim),
                   "cap_embedder.1.bias": (dim,)})
    for i in range(layers):
        block(f"layers.{i}", True)
    out = _PATCH * _PATCH * _IN_CHANNELS
    shapes.update({"final_layer.linear.weight": (out, dim), "final_layer.linear.bias": (out,),
                   "final_layer.adaLN_modulation.1.weight": (dim, mod),
                   "final_layer.adaLN_modulation.1.bias": (dim,)})
    return shapes


def _random_param(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Norm gains ≈ 1, biases and pad tokens small, matrices scaled by 1/√fan_in (stable random forward)."""
    if len(shape) == 1 and (key.endswith("norm.weight") or "norm1" in key or "norm2" in key
                            or key.startswith("cap_embedder.0")):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    if len(shape) == 1 or key.endswith("pad_token"):
        return 0.02 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])


def make_tiny_dit_state_dict(dim: int = DIT_DIM, heads: int = DIT_HEADS, layers: int = DIT_LAYERS,
                             cap_feat_dim: int = CAP_FEAT_DIM, seed: int = 0,
                             dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights of a Z-Image DiT in ComfyUI key layout (see module docstring).

    ``dim`` must be ``heads × 128`` and ≥ 256; ``cap_feat_dim`` is the text-encoder width it consumes.
    Default sizes: 6.42 M parameters (12.8 MB in bf16). Load it with
    :func:`install_tiny_detection_patch` active.
    """
    _check_dit_dims(dim, heads)
    if layers < 1 or cap_feat_dim < 1:
        raise ValueError(f"tiny DiT: layers and cap_feat_dim must be >= 1, got {layers}, {cap_feat_dim}")
    g = torch.Generator().manual_seed(int(seed))
    return {k: _random_param(k, s, g).to(dtype) for k, s in _dit_shapes(dim, layers, cap_feat_dim).items()}


# ----------------------------------------------------------------------------------------- VAE
def _taesd_conv(sd_shapes: dict, prefix: str, n_in: int, n_out: int, bias: bool = True, k: int = 3) -> None:
    sd_shapes[f"{prefix}.weight"] = (n_out, n_in, k, k)
    if bias:
        sd_shapes[f"{prefix}.bias"] = (n_out,)


def _taesd_block(sd_shapes: dict, prefix: str, c: int = 64) -> None:
    for j in (0, 2, 4):
        _taesd_conv(sd_shapes, f"{prefix}.conv.{j}", c, c)


def _taesd_shapes(latent_channels: int) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {}
    # encoder: conv, block, 3 × (strided conv without bias, 3 blocks), conv → latent
    _taesd_conv(s, "taesd_encoder.0", 3, 64)
    _taesd_block(s, "taesd_encoder.1")
    idx = 2
    for _ in range(3):
        _taesd_conv(s, f"taesd_encoder.{idx}", 64, 64, bias=False)
        for j in range(1, 4):
            _taesd_block(s, f"taesd_encoder.{idx + j}")
        idx += 4
    _taesd_conv(s, f"taesd_encoder.{idx}", 64, latent_channels)
    # decoder: clamp, conv, relu, 3 × (3 blocks, upsample, conv without bias), block, conv → RGB
    _taesd_conv(s, "taesd_decoder.1", latent_channels, 64)
    idx = 3
    for _ in range(3):
        for j in range(3):
            _taesd_block(s, f"taesd_decoder.{idx + j}")
        _taesd_conv(s, f"taesd_decoder.{idx + 4}", 64, 64, bias=False)
        idx += 5
    _taesd_block(s, f"taesd_decoder.{idx}")
    _taesd_conv(s, f"taesd_decoder.{idx + 1}", 64, 3)
    return s


def make_tiny_taesd16_state_dict(seed: int = 0, latent_channels: int = 16) -> dict[str, torch.Tensor]:
    """Random TAESD with ``latent_channels`` (16 = Flux/Z-Image latents), float32, ≈2.46 M parameters.

    Includes ``vae_scale`` / ``vae_shift`` with the Flux latent values ComfyUI uses for ``taef1``.
    """
    g = torch.Generator().manual_seed(int(seed))
    sd = {}
    for k, shape in _taesd_shapes(latent_channels).items():
        if len(shape) == 1:
            sd[k] = 0.01 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
    sd["vae_scale"] = torch.tensor(0.3611)
    sd["vae_shift"] = torch.tensor(0.1159)
    return sd


# ----------------------------------------------------------------------------------------- detection patch
def tiny_qwen3_config_from_state_dict(sd: dict) -> dict | None:
    """``qwen3_4b_model_config`` overrides for a tiny Qwen3 in ComfyUI key layout, or None when ``sd`` is not one.

    "Tiny" = a Qwen3 layout (``q_norm`` of width 128) whose width is not a stock ComfyUI Qwen3 width.
    """
    norm = sd.get("model.layers.0.post_attention_layernorm.weight")
    qn = sd.get("model.layers.0.self_attn.q_norm.weight")
    if norm is None or qn is None or qn.shape[0] != HEAD_DIM or norm.shape[0] in (2048, 2560, 4096, 5120):
        return None
    layers = 0
    while f"model.layers.{layers}.post_attention_layernorm.weight" in sd:
        layers += 1
    return {"hidden_size": int(norm.shape[0]),
            "intermediate_size": int(sd["model.layers.0.mlp.gate_proj.weight"].shape[0]),
            "num_hidden_layers": layers,
            "num_attention_heads": int(sd["model.layers.0.self_attn.q_proj.weight"].shape[0]) // HEAD_DIM,
            "num_key_value_heads": int(sd["model.layers.0.self_attn.k_proj.weight"].shape[0]) // HEAD_DIM,
            "vocab_size": int(sd["model.embed_tokens.weight"].shape[0])}


#: Vision-tower tensors ComfyUI (0.26+) detects a Qwen3-VL checkpoint by, with their shapes for the 8B tower
#: (``hidden`` = the language model's width): DeepStack merger norm (4 × 1152) and the merger's output Linear.
VL_MERGE_DIM = 4 * 1152


def tiny_qwen3vl_state_dict(text_sd: dict) -> dict:
    """A Qwen3-VL checkpoint layout around a tiny Qwen3 text model (``model.`` keys): the language model under
    ``model.language_model.`` plus the two vision tensors detection reads (the rest of the tower is absent)."""
    out = {"model.language_model." + k[len("model."):]: v for k, v in text_sd.items() if k.startswith("model.")}
    hidden = text_sd["model.norm.weight"].shape[0]
    out["model.visual.deepstack_merger_list.0.norm.weight"] = torch.ones(VL_MERGE_DIM)
    out["model.visual.merger.linear_fc2.weight"] = torch.zeros(hidden, VL_MERGE_DIM)
    return out


def tiny_qwen3vl_config_from_state_dict(sd: dict) -> tuple[str, dict] | None:
    """``(model_options key, overrides)`` for a tiny Qwen3-VL checkpoint, or None when ``sd`` is not one."""
    if "model.visual.deepstack_merger_list.0.norm.weight" not in sd:
        return None
    text = {"model." + k[len("model.language_model."):]: v for k, v in sd.items()
            if k.startswith("model.language_model.")}
    cfg = tiny_qwen3_config_from_state_dict(text)
    if cfg is None:
        return None
    wide = sd["model.visual.merger.linear_fc2.weight"].shape[0] == 2560
    return ("qwen3vl_4b_model_config" if wide else "qwen3vl_8b_model_config"), cfg


@dataclass
class TinyDetectionPatch:
    """Handle of an installed detection patch; ``uninstall()`` (or leaving the ``with`` block) restores ComfyUI."""

    restore: list = field(default_factory=list)
    installed: bool = True

    def uninstall(self) -> None:
        for owner, name, value in reversed(self.restore):
            setattr(owner, name, value)
        self.restore.clear()
        self.installed = False

    def __enter__(self) -> "TinyDetectionPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


_ACTIVE: list[TinyDetectionPatch] = []


def install_tiny_detection_patch(comfy_modules: Any = None, text_encoders: bool = True) -> TinyDetectionPatch:
    """TEST-ONLY: make ComfyUI detect tiny Z-Image DiTs (and, with ``text_encoders``, tiny Qwen3 files).

    ``comfy_modules``: an object with ``model_detection``, ``supported_models`` and ``sd`` attributes (the
    ComfyUI modules), or None to import them. Effects until ``uninstall()``:

    - ``model_detection.detect_unet_config`` fills the Z-Image head config (heads = dim/128, RoPE axes
      (32, 48, 48), theta 256, Z-Image modulation, time scale 1000, pad multiple 32) for a Lumina2-layout DiT
      with ``x_pad_token`` whose ``dim`` ComfyUI does not know (not 2304 / 3840);
    - ``supported_models.ZImage.unet_config`` becomes ``{"image_model": "lumina2", "z_image_modulation":
      True}`` so such DiTs (and the real 3840 one) build as Z-Image;
    - ``sd.detect_te_model`` reports a tiny Qwen3 (:func:`tiny_qwen3_config_from_state_dict`) as
      ``QWEN3_4B`` and ``sd.load_text_encoder_state_dicts`` passes its sizes as ``qwen3_4b_model_config``.

    Installing twice returns the active patch.
    """
    if _ACTIVE and _ACTIVE[-1].installed:
        return _ACTIVE[-1]
    if comfy_modules is None:
        import comfy.model_detection
        import comfy.sd
        import comfy.supported_models

        comfy_modules = SimpleNamespace(model_detection=comfy.model_detection,
                                        supported_models=comfy.supported_models, sd=comfy.sd)
    md, sm, sd_mod = comfy_modules.model_detection, comfy_modules.supported_models, comfy_modules.sd
    patch = TinyDetectionPatch()

    orig_detect = md.detect_unet_config

    def tiny_aware_detect(state_dict, key_prefix, metadata=None):
        cfg = orig_detect(state_dict, key_prefix, metadata=metadata)
        if (cfg is not None and cfg.get("image_model") == "lumina2" and cfg.get("dim") not in (2304, 3840)
                and f"{key_prefix}x_pad_token" in state_dict and cfg.get("dim", 0) % HEAD_DIM == 0):
            tiny = tiny_dit_config(cfg["dim"], cfg["dim"] // HEAD_DIM, cfg["n_layers"], cfg["cap_feat_dim"])
            cfg = {**cfg, **tiny}
        return cfg

    patch.restore.append((md, "detect_unet_config", orig_detect))
    md.detect_unet_config = tiny_aware_detect
    patch.restore.append((sm.ZImage, "unet_config", sm.ZImage.unet_config))
    sm.ZImage.unet_config = {"image_model": "lumina2", "z_image_modulation": True}

    if text_encoders:
        orig_te = sd_mod.detect_te_model
        orig_load = sd_mod.load_text_encoder_state_dicts

        def tiny_aware_detect_te(sd):
            if tiny_qwen3_config_from_state_dict(sd) is not None:
                return sd_mod.TEModel.QWEN3_4B
            return orig_te(sd)

        def tiny_aware_load_te(state_dicts=(), embedding_directory=None, clip_type=None, model_options=None, **kw):
            model_options = dict(model_options or {})
            if len(state_dicts) == 1:
                cfg = tiny_qwen3_config_from_state_dict(state_dicts[0])
                if cfg is not None:
                    model_options["qwen3_4b_model_config"] = {**cfg, **model_options.get("qwen3_4b_model_config",
                                                                                         {})}
                vl = tiny_qwen3vl_config_from_state_dict(state_dicts[0])
                if vl is not None:  # hosts that detect Qwen3-VL (0.26+) build it at stock size otherwise
                    model_options[vl[0]] = {**vl[1], **model_options.get(vl[0], {})}
            if clip_type is None:
                clip_type = sd_mod.CLIPType.STABLE_DIFFUSION
            # **kw: arguments newer hosts added (e.g. disable_dynamic, 0.16) pass through unchanged
            return orig_load(list(state_dicts), embedding_directory=embedding_directory, clip_type=clip_type,
                             model_options=model_options, **kw)

        patch.restore.append((sd_mod, "detect_te_model", orig_te))
        patch.restore.append((sd_mod, "load_text_encoder_state_dicts", orig_load))
        sd_mod.detect_te_model = tiny_aware_detect_te
        sd_mod.load_text_encoder_state_dicts = tiny_aware_load_te

    _ACTIVE.append(patch)
    return patch


# ----------------------------------------------------------------------------------------- files
def save_safetensors(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a state dict as safetensors atomically (temporary file + ``os.replace``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class TinyModels:
    """Where :func:`write_tiny_models` put each file, and the names the model-folder combos list."""

    models_dir: Path
    dit: Path
    vae: Path
    te: Path
    substitute: Path
    names: dict = field(default_factory=dict)


def write_tiny_models(models_dir: str | os.PathLike, cap_feat_dim: int = CAP_FEAT_DIM, seed: int = 0) -> TinyModels:
    """Write tiny models into ``models_dir`` (a ComfyUI ``models/`` folder):

    - ``diffusion_models/tiny_zimage.safetensors``: tiny Z-Image DiT (bf16) consuming ``cap_feat_dim``;
    - ``vae/tiny_taesd16.safetensors``: 16-channel TAESD;
    - ``text_encoders/tiny_qwen3.safetensors``: the "reference" encoder, Qwen3-4B layout with ComfyUI keys
      (``model.`` prefix, vocab 151936), width ``cap_feat_dim``, ``TE_LAYERS`` (8) layers, bf16
      (made with ``zdf_testkit.tiny_qwen3``);
    - ``text_encoders/tiny_qwen3_embedding/``: the "substitute" encoder as a Hugging Face folder
      (``config.json`` + ``model.safetensors``) in Qwen3-Embedding's flat key layout (no ``model.``
      prefix), vocab 151665, another seed.

    ``names`` maps roles (``dit``, ``vae``, ``te``, ``substitute``) to the names workflows use.
    Existing files are replaced (test fixtures write into fresh temporary folders).
    """
    models_dir = Path(models_dir)
    dit = save_safetensors(make_tiny_dit_state_dict(cap_feat_dim=cap_feat_dim, seed=seed),
                           models_dir / "diffusion_models" / TINY_DIT_FILE)
    vae = save_safetensors(make_tiny_taesd16_state_dict(seed=seed), models_dir / "vae" / TINY_VAE_FILE)
    te_dir = models_dir / "text_encoders"
    ref_cfg = tiny_qwen3.tiny_config(hidden=cap_feat_dim, layers=TE_LAYERS, intermediate=TE_INTERMEDIATE,
                                     vocab=TE_VOCAB)
    sub_cfg = tiny_qwen3.tiny_config(hidden=cap_feat_dim, layers=TE_LAYERS, intermediate=TE_INTERMEDIATE,
                                     vocab=SUBSTITUTE_VOCAB)
    sub_cfg["torch_dtype"] = "bfloat16"
    te = tiny_qwen3.save_single_file(tiny_qwen3.make_state_dict(ref_cfg, seed=seed + 101, dtype=torch.bfloat16),
                                     te_dir / TINY_TE_FILE)
    sub_dir = tiny_qwen3.save_hf_folder(tiny_qwen3.make_state_dict(sub_cfg, seed=seed + 202, dtype=torch.bfloat16),
                                        sub_cfg, te_dir / TINY_SUBSTITUTE_DIR, flat=True)
    return TinyModels(models_dir, dit, vae, te, sub_dir,
                      names={"dit": TINY_DIT_FILE, "vae": TINY_VAE_FILE, "te": TINY_TE_FILE,
                             "substitute": TINY_SUBSTITUTE_DIR})


def iter_tiny_files(models: TinyModels) -> Iterator[Path]:
    """Every file written by :func:`write_tiny_models`."""
    yield from (models.dit, models.vae, models.te, models.substitute / "model.safetensors",
                models.substitute / "config.json")


PATCH_NODE_DIR = Path(__file__).resolve().parent / "comfy_test_patch_node"
PATCH_NODE_NAME = "zdf_test_patch"


def install_test_patch_node(custom_nodes_dir: str | os.PathLike, name: str = PATCH_NODE_NAME) -> Path:
    """Copy the TEST-ONLY patch node (plus this module and ``tiny_qwen3``) to ``custom_nodes_dir/name``.

    Returns the folder.

    A ComfyUI server started with that ``custom_nodes`` folder installs :func:`install_tiny_detection_patch`
    at start-up. Custom nodes load in alphabetical order of their folder names, all before any prompt runs.
    """
    import shutil

    dest = Path(custom_nodes_dir) / name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PATCH_NODE_DIR / "__init__.py", dest / "__init__.py")
    here = Path(__file__).resolve().parent
    for fname in ("tiny_zimage.py", "tiny_qwen3.py"):
        shutil.copyfile(here / fname, dest / fname)
    return dest


# ----------------------------------------------------------------------------------------- inspection
def zimage_cap_embedder(model: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """``(gain [cap_feat_dim], W [dim, cap_feat_dim], b [dim] | None, eps)`` of a loaded Z-Image MODEL.

    ``model`` is a ComfyUI ModelPatcher (``model.model.diffusion_model.cap_embedder`` = RMSNorm → Linear).
    The stored weights are returned as float32 copies (patches are not applied).
    """
    cap = model.model.diffusion_model.cap_embedder
    norm, linear = cap[0], cap[1]
    bias = None if getattr(linear, "bias", None) is None else linear.bias.detach().float().clone()
    eps = norm.eps if getattr(norm, "eps", None) is not None else torch.finfo(torch.float32).eps
    return (norm.weight.detach().float().clone(), linear.weight.detach().float().clone(), bias, float(eps))
