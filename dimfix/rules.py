"""The per-dimension rules, each defined once: median, std ratio and its epsilon, dead, hyperactive,
outlier. The analysis (``compare``, ``analysis``), the fixes and blending all call these.

Conventions
    - Every rule works on the last axis of float64 tensors (``[D]`` or batched ``[..., D]``).
    - ``median``: the true median (mean of the two middle values for an even count) unless
      ``lower=True``: the lower middle value, ``torch.median``'s semantics, which the original
      research used. The fixes' origin modes pass ``lower=True`` for parity with it.
    - ``std_ratio``: ``(σ_tgt + eps) / (σ_ref + eps)`` with ``eps = eps_rel × median(σ_ref ∪ σ_tgt)``
      (the pooled σ of both models; ``eps_rel × max`` when that median is 0; never less than the
      smallest positive float64), so ``log_ratio(a, b) = -log_ratio(b, a)`` exactly. With
      ``origin=True`` it is the original research's ``σ_tgt / q`` with ``q = σ_ref``, or 1 where
      ``σ_ref <`` :data:`ORIGIN_STD_EPS`.
    - ``dead``: ``σ < dead_abs`` or ``σ < dead_rel × median σ``; ``absolute_only=True`` is the
      origin's rule (``σ < dead_abs``). ``hyper``: ``σ > hyper_mult × median σ``.
    - ``outliers``: two-sided, ``ratio > τ`` (high) or ``ratio < 1/τ`` (low).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import Thresholds

_F64 = torch.float64
_TINY = torch.finfo(_F64).tiny
#: Absolute σ guard of the original research (its ratio denominator and its rescale/full skip).
ORIGIN_STD_EPS = 1e-6

__all__ = ["ORIGIN_STD_EPS", "median", "ratio_eps", "std_ratio", "log_ratio", "dead", "hyper", "outliers"]


def _f64(x: Any) -> torch.Tensor:
    """``x`` as a float64 CPU tensor (a copy when the dtype or device changes; never modified)."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=_F64)


def median(x: torch.Tensor, lower: bool = False) -> torch.Tensor:
    """Median over the last axis (float64, that axis removed); NaN for an empty axis.

    ``lower=True``: the lower middle value (``torch.median``), as the original research used.
    """
    v = _f64(x)
    n = v.shape[-1] if v.dim() else 1
    v = v.reshape(*v.shape[:-1], n) if v.dim() else v.reshape(1)
    if n == 0:
        return torch.full(v.shape[:-1], math.nan, dtype=_F64)
    s = v.sort(dim=-1).values
    if lower or n % 2:
        return s[..., (n - 1) // 2]
    return (s[..., n // 2 - 1] + s[..., n // 2]) / 2


def ratio_eps(sigma_ref: torch.Tensor, sigma_tgt: torch.Tensor, eps_rel: float) -> torch.Tensor:
    """The absolute epsilon of :func:`std_ratio` (float64, shape ``[..., 1]``) from both models' σ.

    ``sigma_ref`` may have fewer leading dims than ``sigma_tgt`` (one reference for several layers).
    """
    ref, tgt = _f64(sigma_ref), _f64(sigma_tgt)
    if ref.shape[-1] != tgt.shape[-1]:
        raise ValueError(f"std ratio: sigma_tgt has {tgt.shape[-1]} dims, sigma_ref {ref.shape[-1]}")
    if not eps_rel >= 0:
        raise ValueError(f"std ratio: eps_rel must be >= 0, got {eps_rel}")
    shape = torch.broadcast_shapes(ref.shape, tgt.shape)
    pooled = torch.cat([ref.expand(shape), tgt.expand(shape)], -1)
    eps = eps_rel * median(pooled).unsqueeze(-1)
    if pooled.shape[-1]:
        eps = torch.where(eps > 0, eps, eps_rel * pooled.amax(-1, keepdim=True))
    return torch.where(torch.isfinite(eps), eps.clamp_min(_TINY), torch.full_like(eps, _TINY))


def std_ratio(sigma_tgt: torch.Tensor, sigma_ref: torch.Tensor, eps_rel: float = Thresholds.eps_rel,
              origin: bool = False) -> torch.Tensor:
    """Per-dim ``σ_tgt / σ_ref`` (float64) with the epsilon rule of the module docs.

    ``origin=True``: the original research's ``σ_tgt / q`` (``q = 1`` where ``σ_ref < 1e-6``).
    """
    tgt, ref = _f64(sigma_tgt), _f64(sigma_ref)
    if origin:
        if tgt.shape != ref.shape:
            raise ValueError(f"std ratio: sigma_tgt has shape {tuple(tgt.shape)}, sigma_ref {tuple(ref.shape)}")
        return tgt / torch.where(ref < ORIGIN_STD_EPS, torch.ones_like(ref), ref)
    eps = ratio_eps(ref, tgt, eps_rel)
    return (tgt + eps) / (ref + eps)


def log_ratio(sigma_tgt: torch.Tensor, sigma_ref: torch.Tensor, eps_rel: float = Thresholds.eps_rel) -> torch.Tensor:
    """``log(σ_tgt + eps) - log(σ_ref + eps)``: swapping the models flips the sign bit for bit."""
    tgt, ref = _f64(sigma_tgt), _f64(sigma_ref)
    eps = ratio_eps(ref, tgt, eps_rel)
    return torch.log(tgt + eps) - torch.log(ref + eps)


def dead(sigma: torch.Tensor, th: Thresholds, lower: bool = False, absolute_only: bool = False) -> torch.Tensor:
    """Bool ``[..., D]``: dims whose σ is below ``dead_abs`` (or ``dead_rel`` × the median σ)."""
    s = _f64(sigma)
    out = s < th.dead_abs
    if absolute_only:
        return out
    return out | (s < th.dead_rel * median(s, lower).unsqueeze(-1))


def hyper(sigma: torch.Tensor, th: Thresholds, lower: bool = False) -> torch.Tensor:
    """Bool ``[..., D]``: dims whose σ exceeds ``hyper_mult`` × the same model's median σ."""
    s = _f64(sigma)
    return s > th.hyper_mult * median(s, lower).unsqueeze(-1)


def outliers(ratio: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)`` bool ``[..., D]``: ``ratio > τ`` and ``ratio < 1/τ`` (two-sided outliers)."""
    r = _f64(ratio)
    return r > tau, r < 1.0 / tau
