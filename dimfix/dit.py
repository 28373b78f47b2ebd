"""DiT-aware views of text-encoder hidden states, from Z-Image's caption embedder.

Z-Image's first operation on the caption is ``cap_embedder = Linear(RMSNorm(x))``:

    f(x) = W · (g ⊙ x / sqrt(mean(x²) + eps)) + b        W ∈ R^{dim×D}, g ∈ R^D, b ∈ R^dim

so the DiT never sees the raw scale of a token (a per-token scalar on ``x`` is a no-op up to
``eps``), only its direction, re-weighted per dimension by ``g`` and mixed by ``W``.

- :func:`cap_sensitivity` ``s_d = |g_d| · ‖W[:, d]‖₂``: how strongly a unit change of the
  normalised input in dim ``d`` moves the caption features (optionally × ``σ_ref,d``: the typical
  size of that change). It replaces the original research's "attention sensitivity" (a softmax of
  token norms, one-hot on the sink token).
- :func:`rank_dims`: dims ordered by ``s_d × |ln(σ_tgt,d / σ_ref,d)|``.
- :meth:`CapEmbedder.features`: the caption embedder's output; :func:`token_cosine64`: the per-token
  cosine (of hidden states, or of two encoders' caption features).

Everything is computed in float64 from upcast copies (bf16/fp16 weights and inputs are fine);
inputs are never modified. Results are float32 unless stated otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CapEmbedder", "cap_sensitivity", "rank_dims", "check_cap_weights", "token_cosine64"]

_F64 = torch.float64


def _f64(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t.detach().to(device="cpu", dtype=_F64)


def check_cap_weights(gain: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      eps: float | None = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Validate caption-embedder weights; returns float64 CPU copies ``(gain, weight, bias, eps)``.

    ``gain`` ``[D]`` (the RMSNorm weight), ``weight`` ``[dim, D]`` and ``bias`` ``[dim]`` (the Linear),
    ``eps`` the RMSNorm epsilon (``None`` = ``torch.finfo(float32).eps``, like ``torch.nn.RMSNorm``).
    """
    g, w = _f64(gain, "gain"), _f64(weight, "weight")
    if g.dim() != 1 or g.numel() == 0:
        raise ValueError(f"gain (the RMSNorm weight) must have shape [D], got {tuple(g.shape)}")
    if w.dim() != 2 or w.shape[1] != g.shape[0]:
        raise ValueError(f"weight (the Linear weight) must have shape [dim, {g.shape[0]}] to match gain [D], "
                         f"got {tuple(w.shape)}")
    b = None
    if bias is not None:
        b = _f64(bias, "bias")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"bias must have shape [{w.shape[0]}] (the Linear's output size), got {tuple(b.shape)}")
    if eps is None:
        eps = float(torch.finfo(torch.float32).eps)
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    for name, t in (("gain", g), ("weight", w), ("bias", b)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
    return g, w, b, eps


@dataclass(frozen=True)
class CapEmbedder:
    """Validated float64 CPU copies of a caption embedder's weights (build with :meth:`from_weights`)."""

    gain: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def from_weights(cls, gain: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     eps: float | None = 1e-5) -> "CapEmbedder":
        return cls(*check_cap_weights(gain, weight, bias, eps))

    @property
    def in_dim(self) -> int:
        return int(self.gain.shape[0])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``Linear(RMSNorm(x))`` for ``x`` ``[..., D]``, float64 (a new tensor; ``x`` is only read)."""
        return _features64(x, self.gain, self.weight, self.bias, self.eps)

    def sensitivity(self, sigma_ref: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`cap_sensitivity` of these weights (float32 ``[D]``)."""
        return cap_sensitivity(self.gain, self.weight, sigma_ref)


def cap_sensitivity(gain: torch.Tensor, weight: torch.Tensor, sigma_ref: torch.Tensor | None = None) -> torch.Tensor:
    """``s_d = |g_d| · ‖W[:, d]‖₂`` (float32 ``[D]``), times ``sigma_ref[d]`` when given."""
    g, w, _, _ = check_cap_weights(gain, weight)
    s = g.abs() * torch.linalg.vector_norm(w, dim=0)
    if sigma_ref is not None:
        sr = _f64(sigma_ref, "sigma_ref").reshape(-1)
        if sr.numel() != s.numel():
            raise ValueError(f"sigma_ref must have {s.numel()} entries (one per dim), got {sr.numel()}")
        s = s * sr
    return s.float()


def rank_dims(sensitivity: torch.Tensor, log_ratio: torch.Tensor, top: int = 20) -> list[dict[str, float | int]]:
    """The ``top`` dims by ``score = sensitivity × |log_ratio|`` (descending; ties keep dim order).

    Each entry: ``{dim, score, sensitivity, log_ratio, ratio}`` (``ratio = exp(log_ratio)``).
    Non-finite scores sort last.
    """
    s = _f64(sensitivity, "sensitivity").reshape(-1)
    lr = _f64(log_ratio, "log_ratio").reshape(-1)
    if s.shape != lr.shape:
        raise ValueError(f"sensitivity has {s.numel()} dims but log_ratio {lr.numel()}")
    if int(top) < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    score = s * lr.abs()
    key = torch.where(torch.isfinite(score), -score, torch.full_like(score, math.inf))
    order = torch.sort(key, stable=True).indices[: int(top)].tolist()
    return [{"dim": int(d), "score": float(score[d]), "sensitivity": float(s[d]), "log_ratio": float(lr[d]),
             "ratio": float(torch.exp(lr[d]))} for d in order]


def _features64(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    x64 = _f64(x, "x")
    if x64.dim() < 1 or x64.shape[-1] != g.shape[0]:
        raise ValueError(f"x must have shape [..., {g.shape[0]}] to match the caption embedder, got {tuple(x.shape)}")
    n = x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + eps) * g
    out = n @ w.T
    return out + b if b is not None else out


def token_cosine64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of ``a[..., i, :]`` and ``b[..., i, :]`` (same shapes) in float64; zero-norm tokens → NaN.

    Each token is scaled by its max magnitude first, so 1e4-sized sink tokens cannot overflow.
    """
    x, y = a.to(_F64), b.to(_F64)
    sx = x.abs().amax(-1, keepdim=True)
    sy = y.abs().amax(-1, keepdim=True)
    xs = x / sx
    ys = y / sy
    return (xs * ys).sum(-1) / (torch.linalg.vector_norm(xs, dim=-1) * torch.linalg.vector_norm(ys, dim=-1))
