"""Mixing two embedding sequences: length alignment, outlier handling, RMS matching, blending.

``blend(primary, secondary, alpha)`` returns ``alpha·primary + (1 - alpha)·secondary_aligned`` with
the primary's token count, so ``alpha`` is the weight of the PRIMARY (as ComfyUI's
``ConditioningAverage`` ``conditioning_to_strength``). Typical uses: a Qwen3-4B × Qwen3-Embedding
ensemble (primary Qwen3-4B, α 0.7–0.9), a layer -2 × -6 mix, a VL × text mix (primary text).

All arithmetic is float32 (RMS in float64); outputs have the primary's dtype; inputs are never
modified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Thresholds
from .fixes import OUTLIER_MODES, apply_plan, outlier_plan
from .fixtable import FixTable

ALIGN_MODES = ("pool", "interp", "truncate", "pad_mean")


def _as_batched(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if x.ndim == 2:
        return x.unsqueeze(0), True
    if x.ndim == 3:
        return x, False
    raise ValueError(f"{name} must have shape [T, D] or [B, T, D], got {tuple(x.shape)}")


def _pad(x: torch.Tensor, length: int, pad: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] cut or padded at the end with pad ([D] or [B, 1, D]) to ``length`` tokens."""
    b, t, d = x.shape
    if t >= length:
        return x[:, :length].clone()
    fill = pad.to(torch.float32).reshape(-1, 1, d).expand(b, length - t, d)
    return torch.cat([x, fill], dim=1)


def align(x: torch.Tensor, length: int, mode: str = "pool", pad_value: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``x`` ([T2, D] or [B, T2, D]) to exactly ``length`` tokens; float32 out.

    - ``pool``: adaptive average pooling over tokens (recommended: every input token contributes).
    - ``interp``: anti-aliased linear interpolation -- when shrinking, a tent (triangle) low-pass as
      wide as the shrink factor precedes linear resampling (PIL-style); when growing, plain linear.
    - ``truncate``: cut; if shorter, pad with ``pad_value`` (default: x's own per-dim mean, never 0).
    - ``pad_mean``: cut; if shorter, pad with ``pad_value`` (required: the reference mean).
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"alignment must be one of {', '.join(ALIGN_MODES)}; got {mode!r}")
    if int(length) < 1:
        raise ValueError(f"alignment length must be >= 1, got {length}")
    length = int(length)
    xb, squeeze = _as_batched(x, "sequence to align")
    if xb.shape[1] < 1:
        raise ValueError("cannot align an empty sequence (0 tokens)")
    xf = xb.to(torch.float32)
    t2 = xf.shape[1]
    if t2 == length:
        out = xf.clone()
    elif mode == "pool":
        out = F.adaptive_avg_pool1d(xf.transpose(1, 2), length).transpose(1, 2).contiguous()
    elif mode == "interp":
        img = xf.transpose(1, 2).unsqueeze(2)  # [B, D, 1, T2]
        out = F.interpolate(img, size=(1, length), mode="bilinear", align_corners=False, antialias=True)
        out = out.squeeze(2).transpose(1, 2).contiguous()
    else:
        if pad_value is None:
            if mode == "pad_mean":
                raise ValueError("alignment 'pad_mean' needs pad_value (the reference per-dim mean, e.g. a fix "
                                 "table's reference_mean)")
            pad = xf.mean(dim=1, keepdim=True)
        else:
            pad = torch.as_tensor(pad_value, dtype=torch.float32, device=xf.device)
            if pad.shape[-1] != xf.shape[-1] and pad.numel() != 1:
                raise ValueError(f"pad_value width {pad.shape[-1]} does not match the sequence width {xf.shape[-1]}")
            if pad.numel() == 1:
                pad = pad.reshape(1).expand(xf.shape[-1])
        out = _pad(xf, length, pad)
    return out.squeeze(0) if squeeze else out


def handle_outliers(x: torch.Tensor, table: FixTable | None, mode: str,
                    thresholds: Thresholds | None = None) -> torch.Tensor:
    """Treat the dims the table flags as outliers (σ_tgt/σ_ref > τ or < 1/τ, two-sided) with
    :func:`dimfix.fixes.outlier_plan`; ``none`` returns a copy.

    The table's *target* statistics must describe ``x``'s encoder, its *reference* the primary's.
    ``rescale`` is the smallest change that stops a dim being an outlier (the research's VL
    "clamp"/"scale", made two-sided and mean-preserving); use Embedding Dimension Fix first for a
    full moment match.
    """
    if mode not in OUTLIER_MODES:
        raise ValueError(f"outlier handling must be one of {', '.join(OUTLIER_MODES)}; got {mode!r}")
    if mode == "none":
        return x.clone()
    if table is None:
        raise ValueError(f"outlier handling {mode!r} needs a fix table (reference vs the secondary's encoder)")
    return apply_plan(x, outlier_plan(table, mode, thresholds))


def rms_match(x: torch.Tensor, like: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each token of ``x`` [..., T, D] so its RMS equals that of the aligned token of ``like``.

    Computed in float64; tokens of ``x`` with RMS ≤ ``eps`` (all ~zero) are left unchanged.
    Returns ``x``'s dtype.
    """
    if x.ndim < 2 or like.ndim < 2 or x.shape[-2] != like.shape[-2]:
        raise ValueError(f"rms_match needs aligned [..., T, D] sequences: shapes {tuple(x.shape)} and "
                         f"{tuple(like.shape)}")
    xd = x.to(torch.float64)
    r_x = xd.pow(2).mean(dim=-1, keepdim=True).sqrt()
    r_l = like.to(torch.float64).pow(2).mean(dim=-1, keepdim=True).sqrt()
    gain = torch.where(r_x > eps, r_l / r_x.clamp_min(eps), torch.ones_like(r_x))
    return (xd * gain).to(x.dtype)


def blend(primary: torch.Tensor, secondary: torch.Tensor, alpha: float, *, align: str = "pool",
          outliers: str = "none", table: FixTable | None = None, rms_match: bool = False,
          thresholds: Thresholds | None = None) -> torch.Tensor:
    """``alpha·primary + (1 - alpha)·secondary`` with the secondary aligned to the primary's length.

    Order: outlier handling on the secondary's own tokens, alignment to the primary's T, optional
    per-token RMS matching to the primary, then the mix. Shapes ``[T, D]`` or ``[B, T, D]``; the
    secondary's batch must be 1 or the primary's. ``alpha`` ∈ [0, 1] is the weight of the primary.
    """
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha (weight of the primary) must be in [0, 1], got {alpha!r}")
    p, p_squeeze = _as_batched(primary, "primary")
    s, _ = _as_batched(secondary, "secondary")
    if p.shape[-1] != s.shape[-1]:
        raise ValueError(f"cannot blend: primary width {p.shape[-1]} differs from secondary width {s.shape[-1]}")
    if s.shape[0] not in (1, p.shape[0]):
        raise ValueError(f"secondary batch {s.shape[0]} must be 1 or the primary's batch {p.shape[0]}")
    if p.shape[1] < 1 or s.shape[1] < 1:
        raise ValueError("cannot blend empty sequences (0 tokens)")
    if a == 1.0:
        return primary.clone()
    s = handle_outliers(s, table, outliers, thresholds)
    pad_value = table.reference_mean if (align == "pad_mean" and table is not None) else None
    s = align_fn(s, p.shape[1], align, pad_value)
    if rms_match:
        s = _rms_match(s, p)
    pf = p.to(torch.float32)
    out = s.expand(p.shape[0], -1, -1).clone() if a == 0.0 else torch.lerp(s.to(torch.float32), pf, a)
    out = out.squeeze(0) if p_squeeze else out
    return out.to(primary.dtype)


# ``blend``'s keyword arguments shadow these functions inside it.
align_fn = align
_rms_match = rms_match
