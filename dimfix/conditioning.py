"""Pure helpers for ComfyUI CONDITIONING values (no ComfyUI import).

A CONDITIONING is a list of ``[tensor (B, T, D), dict]`` entries; Z-Image's text encoder gives
``[[cond (1, T, 2560), {"pooled_output": None, "attention_mask": ones (1, T) int64}]]``. Z-Image
attends to every caption token, so a mask with zeros is never correct here: tokens must be trimmed.

Half precision: fp16 input is accepted, every computation is upcast to float32 and a warning is
logged, because Qwen3's massive activations (≈1e4 on the sink token) overflow fp16 easily; bf16 or
fp32 encoders are recommended.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from .tokens import ZIMAGE_WIDTH

log = logging.getLogger(__name__)


Conditioning = list  # list[list[torch.Tensor | dict]]


def ones_mask(batch: int, length: int) -> torch.Tensor:
    """An all-ones int64 attention mask of shape (batch, length)."""
    return torch.ones((int(batch), int(length)), dtype=torch.int64)


def validate(cond: Any, socket: str = "conditioning", width: int | None = None, node: str = "") -> None:
    """Raise a ValueError naming ``node`` and ``socket`` unless ``cond`` is a usable Z-Image CONDITIONING."""
    where = f"{node}: input '{socket}'" if node else f"input '{socket}'"
    if not isinstance(cond, (list, tuple)):
        raise ValueError(f"{where} expects a CONDITIONING (a list of [tensor, dict] entries), "
                         f"got {type(cond).__name__}")
    if len(cond) == 0:
        raise ValueError(f"{where} is an empty CONDITIONING (no entries); connect a text encoder output")
    for i, entry in enumerate(cond):
        at = f"{where}, entry {i}"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"{at}: expected a [tensor, dict] pair, got {type(entry).__name__}"
                             + (f" of length {len(entry)}" if isinstance(entry, (list, tuple)) else ""))
        t, meta = entry
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{at}: expected a tensor first, got {type(t).__name__}")
        if not isinstance(meta, dict):
            raise ValueError(f"{at}: expected a dict second, got {type(meta).__name__}")
        if t.ndim == 4:
            raise ValueError(f"{at}: tensor has shape {tuple(t.shape)} (batch, layers, tokens, width) -- an "
                             "'all layers' output; select one layer (Hidden Layer Select) before this node")
        if t.ndim != 3:
            raise ValueError(f"{at}: tensor must have shape (batch, tokens, width), got {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{at}: tensor has no tokens (shape {tuple(t.shape)})")
        if not t.is_floating_point():
            raise ValueError(f"{at}: tensor dtype {t.dtype} is not floating point")
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        if n_nan or n_inf:
            hint = ""
            if t.dtype == torch.float16:
                hint = " (fp16 overflows on Qwen3's massive activations: use bf16 or fp32)"
            raise ValueError(f"{at}: tensor contains {n_nan} NaN and {n_inf} Inf value(s){hint}; refusing to use it")
        if width is not None and t.shape[-1] != width:
            raise ValueError(f"{at}: width {t.shape[-1]} does not match the expected width {width}")
        mask = meta.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise ValueError(f"{at}: attention_mask must be a tensor, got {type(mask).__name__}")
            zeros = int((mask == 0).sum())
            if zeros:
                raise ValueError(f"{at}: attention_mask has {zeros} zero(s). Z-Image attends to every caption "
                                 "token (a mask with zeros crashes or changes the image), so padded tokens must "
                                 "be trimmed from the tensor instead of masked")
        if t.dtype == torch.float16:
            log.warning("%s: fp16 conditioning; computing in float32, but Qwen3's massive activations overflow "
                        "fp16 -- prefer a bf16 or fp32 text encoder", at)


def sequences(cond: Any, socket: str = "conditioning", node: str = "") -> list[torch.Tensor]:
    """The ``[T, D]`` token sequences of a CONDITIONING produced anywhere: every entry, every batch item.

    For analysing conditionings from other encoders (e.g. a VL model), which may pad: tokens whose
    ``attention_mask`` is 0 are left out (trimmed, never kept as padding). Errors name ``node`` and
    ``socket``: not a CONDITIONING, 4-D (several layers) or non-3-D tensors, non-float tensors, NaN/Inf
    (with their count), a mask of another length, a sequence with no unmasked token. fp16 is accepted
    (callers compute in float64; see the module docs).
    """
    where = f"{node}: input '{socket}'" if node else f"input '{socket}'"
    if not isinstance(cond, (list, tuple)) or not cond:
        raise ValueError(f"{where} must be a non-empty CONDITIONING (a list of [tensor, dict] entries)")
    out = []
    for i, entry in enumerate(cond):
        at = f"{where}, entry {i}"
        if not isinstance(entry, (list, tuple)) or len(entry) < 1 or not isinstance(entry[0], torch.Tensor):
            raise ValueError(f"{at} is not a [tensor, dict] pair")
        t = entry[0]
        meta = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        if t.ndim == 4:
            raise ValueError(f"{at} has shape {tuple(t.shape)} (4-D: several layers); select one layer first "
                             "(e.g. with Hidden Layer Select) -- expected [batch, tokens, width]")
        if t.ndim != 3:
            raise ValueError(f"{at} has shape {tuple(t.shape)}; expected [batch, tokens, width]")
        if not t.is_floating_point():
            raise ValueError(f"{at}: tensor dtype {t.dtype} is not floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{at} contains {bad} NaN/Inf value(s); refusing to analyse it")
        mask = meta.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2
                                 or mask.shape[-1] != t.shape[1] or mask.shape[0] not in (1, t.shape[0])):
            raise ValueError(f"{at}: attention_mask of shape "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__} "
                             f"does not match the tensor's {tuple(t.shape[:2])}")
        for b in range(t.shape[0]):
            x = t[b]
            if mask is not None:
                keep = mask[min(b, mask.shape[0] - 1)].to(device=x.device, dtype=torch.bool)
                if not bool(keep.all()):
                    x = x[keep]
            if x.shape[0] == 0:
                raise ValueError(f"{at}, batch item {b} has no unmasked token")
            out.append(x)
    return out


def map_tensors(cond: Conditioning, fn: Callable[[torch.Tensor, dict], torch.Tensor],
                set_keys: dict | None = None, drop_keys: tuple[str, ...] = ()) -> Conditioning:
    """A NEW CONDITIONING with ``fn(tensor, meta)`` applied to every entry; ``cond`` is untouched.

    Each entry gets a shallow copy of its dict (``pooled_output`` and every other key kept), without
    ``drop_keys`` and with ``set_keys`` added. The ``attention_mask`` is replaced by an all-ones int64
    (B, T_new) mask when the entry had a mask or its width is a Z-Image width (Z-Image's text encoder
    always emits one); other entries get none.
    """
    out: Conditioning = []
    for t, meta in cond:
        new = fn(t, meta)
        if not isinstance(new, torch.Tensor) or new.ndim != 3:
            raise ValueError(f"conditioning function must return a (batch, tokens, width) tensor, got "
                             f"{tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}")
        new_meta = {k: v for k, v in meta.items() if k not in drop_keys}
        new_meta.update(set_keys or {})
        if "attention_mask" in meta or new.shape[-1] == ZIMAGE_WIDTH:
            new_meta["attention_mask"] = ones_mask(new.shape[0], new.shape[1]).to(new.device)
        out.append([new, new_meta])
    return out


# ---------------------------------------------------------------------------- provenance
#: Keys this pack records in a CONDITIONING entry's dict: plain strings and ints, which ComfyUI carries
#: along and its samplers ignore. ``MODEL_KEY``: the encoder (``<file or folder>@<fingerprint>``, set by
#: the Qwen3 Embedding Loader's CLIP); ``LAYER_KEY``: its HF ``hidden_states`` index; ``FIX_KEY``: the fix
#: already applied (set by Embedding Dimension Fix).
MODEL_KEY = "dimfix_model"
LAYER_KEY = "dimfix_layer"
FIX_KEY = "dimfix_fix"
SOURCE_KEYS = (MODEL_KEY, LAYER_KEY)


def provenance_warnings(cond: Conditioning, target_model: str, layer: int | str) -> list[str]:
    """What the entries' recorded source says against a fix table measured on ``target_model`` at ``layer``.

    Only recorded facts are compared (an entry without the keys, e.g. from the stock CLIP loader, is
    unknown, not wrong). Returns one message per mismatch and per already fixed entry.
    """
    out = []
    want = {MODEL_KEY: ("encoder", str(target_model)), LAYER_KEY: ("layer", str(layer))}
    for i, (_, meta) in enumerate(cond):
        for key, (what, expected) in want.items():
            got = meta.get(key)
            if got is not None and expected and str(got) != expected:
                shown = (repr(str(got)), repr(expected)) if key == MODEL_KEY else (str(got), expected)
                out.append(f"conditioning entry {i} comes from {what} {shown[0]} but the fix table was measured on "
                           f"{what} {shown[1]}")
        done = meta.get(FIX_KEY)
        if done is not None:
            out.append(f"conditioning entry {i} was already fixed ({done}); fixing it again compounds the "
                       "corrections")
    return out
