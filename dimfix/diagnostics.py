"""Diagnostics the per-dim σ comparison misses: shape, mixing, and what the DiT sees.

- :func:`shape_flags`: dims whose skewness or excess kurtosis differs between target and reference
  by more than ``k`` standard errors of the difference. The standard errors are the exact
  small-sample ones of the bias-corrected estimators G1/G2 for normal data,
  ``SE(G1) = sqrt(6n(n-1) / ((n-2)(n+1)(n+3)))``, ``SE(G2) = 2·SE(G1)·sqrt((n²-1) / ((n-3)(n+5)))``,
  each side with its own token count. For dims that are far from normal in *both* models the true
  sampling error is larger, so ``k`` (default 5) is set well above the normal quantiles.
- :func:`mixed_dims`: per-dim correlation of aligned tokens; a dim is *mixed* when the correlation is
  low although σ matches (the "98 % cosine yet broken" case).
- :class:`TokenSimilarity`: streaming float64 reductions over aligned tokens of the raw per-token
  cosine, the *standardised* cosine (each dim in reference-σ units about the reference mean) and the
  caption-space cosine (``Linear(RMSNorm(x))`` of a :class:`~dimfix.dit.CapEmbedder`; without one the
  weight-free proxy ``RMSNorm(x)``, whose cosine equals the raw cosine since a per-token scale does
  not change a cosine), plus squared errors and spreads in the standardised and caption spaces.
- :func:`dit_verdict`: fails when the caption-space cosine (with the model) or the standardised
  cosine (without) is below 0.99; the seeds' four criteria are kept beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .compare import Verdict
from .dit import CapEmbedder, token_cosine64
from .pairs import PairSums
from .stats import DimStats

_F64 = torch.float64
#: Standard errors of the difference a shape statistic must exceed to flag a dim.
SHAPE_K = 5.0
#: Minimum per-token cosine (caption space, else standardised) of the DiT-aware verdict.
DIT_COSINE_MIN = 0.99

__all__ = ["ShapeFlags", "shape_flags", "skew_se", "kurtosis_se", "MixedDims", "mixed_dims",
           "TokenSimilarity", "DitVerdict", "dit_verdict", "DIT_COSINE_MIN", "SHAPE_K"]


def skew_se(n: int) -> float:
    """Exact standard error of the bias-corrected sample skewness G1 of ``n`` normal values."""
    if n < 3:
        return math.nan
    return math.sqrt(6.0 * n * (n - 1) / ((n - 2.0) * (n + 1.0) * (n + 3.0)))


def kurtosis_se(n: int) -> float:
    """Exact standard error of the bias-corrected sample excess kurtosis G2 of ``n`` normal values."""
    if n < 4:
        return math.nan
    return 2.0 * skew_se(n) * math.sqrt((n * n - 1.0) / ((n - 3.0) * (n + 5.0)))


@dataclass(frozen=True)
class ShapeFlags:
    """Result of :func:`shape_flags` (float32 ``[D]`` tensors; ``flagged`` sorted dims)."""

    skew_ref: torch.Tensor
    skew_tgt: torch.Tensor
    kurt_ref: torch.Tensor
    kurt_tgt: torch.Tensor
    z_skew: torch.Tensor
    z_kurt: torch.Tensor
    flagged: list[int]
    k: float


def shape_flags(ref: DimStats, tgt: DimStats, k: float = SHAPE_K) -> ShapeFlags:
    """Flag dims whose G1 or G2 differ by more than ``k`` combined standard errors (module docs).

    Zero-variance dims (NaN moments) are never flagged here: the dead-dim rule covers them.
    """
    for name, s in (("ref", ref), ("tgt", tgt)):
        if not isinstance(s, DimStats):
            raise TypeError(f"shape_flags: {name} must be a DimStats, got {type(s).__name__}")
        if s.count < 4:
            raise ValueError(f"shape_flags: {name} holds {s.count} token(s); need at least 4 for a kurtosis")
    if ref.dim != tgt.dim:
        raise ValueError(f"shape_flags: ref has {ref.dim} dims, tgt {tgt.dim}")
    if not k > 0:
        raise ValueError(f"shape_flags: k must be > 0, got {k}")
    s_r, s_t = ref.skewness(bias=False), tgt.skewness(bias=False)
    k_r, k_t = ref.kurtosis(bias=False), tgt.kurtosis(bias=False)
    z_s = (s_t - s_r).abs() / math.hypot(skew_se(ref.count), skew_se(tgt.count))
    z_k = (k_t - k_r).abs() / math.hypot(kurtosis_se(ref.count), kurtosis_se(tgt.count))
    flag = (torch.nan_to_num(z_s, nan=0.0) > k) | (torch.nan_to_num(z_k, nan=0.0) > k)
    return ShapeFlags(s_r.float(), s_t.float(), k_r.float(), k_t.float(), z_s.float(), z_k.float(),
                      torch.nonzero(flag).reshape(-1).tolist(), float(k))


@dataclass(frozen=True)
class MixedDims:
    """Per-dim correlation and σ ratio of aligned tokens (float32 ``[D]``) and the mixed dims."""

    correlation: torch.Tensor
    sigma_ratio: torch.Tensor
    mixed: list[int]


def mixed_dims(pairs: PairSums, corr_min: float = 0.9, sigma_band: float = 1.5) -> MixedDims:
    """Dims whose aligned-token correlation is below ``corr_min`` while σ_tgt/σ_ref is within
    ``[1/sigma_band, sigma_band]`` (``pairs`` may be ``full=False``)."""
    if isinstance(pairs, PairSums):
        pairs.flush()
    if not isinstance(pairs, PairSums) or pairs.count < 2:
        raise ValueError("mixed_dims: need a PairSums with at least 2 aligned token pairs")
    if not sigma_band >= 1.0:
        raise ValueError(f"mixed_dims: sigma_band must be >= 1, got {sigma_band}")
    r = pairs.correlation().double()
    ratio = (pairs.dxx / pairs.dyy).sqrt()
    ok = torch.isfinite(ratio) & (ratio <= sigma_band) & (ratio >= 1.0 / sigma_band)
    mixed = ok & (torch.nan_to_num(r, nan=1.0) < corr_min)
    return MixedDims(r.float(), ratio.float(), torch.nonzero(mixed).reshape(-1).tolist())


class TokenSimilarity:
    """Streaming similarity of aligned target/reference tokens (float64 sums; see module docs).

    Args:
        ref_mean, ref_std: the reference per-dim mean and σ (``[D]``) of the standardised space.
        cap: the caption embedder, or None for the weight-free RMSNorm-only proxy.
    """

    def __init__(self, ref_mean: torch.Tensor, ref_std: torch.Tensor, cap: CapEmbedder | None = None) -> None:
        self.mu = torch.as_tensor(ref_mean).detach().to("cpu", _F64).reshape(-1)
        sd = torch.as_tensor(ref_std).detach().to("cpu", _F64).reshape(-1)
        if sd.shape != self.mu.shape or not bool(torch.isfinite(sd).all()):
            raise ValueError("TokenSimilarity: ref_std must be finite with as many entries as ref_mean")
        med = float(sd.median())
        self.sd = sd.clamp(min=max(1e-6 * med, torch.finfo(_F64).tiny) if med > 0 else 1.0)
        if cap is not None and cap.in_dim != self.mu.numel():
            raise ValueError(f"TokenSimilarity: the caption embedder takes {cap.in_dim} dims, the stats have "
                             f"{self.mu.numel()}")
        self.cap = cap
        self.count = 0
        self.sums = {k: 0.0 for k in ("raw", "std", "cap", "std_err", "std_spread", "cap_err", "cap_sq")}
        self.cap_sum: torch.Tensor | None = None

    def _space(self, t: torch.Tensor) -> torch.Tensor:
        if self.cap is not None:
            return self.cap.features(t)
        return t * torch.rsqrt((t * t).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add aligned tokens: target (or fixed target) ``x`` and reference ``y`` (``[T, D]``)."""
        if x.shape != y.shape or x.dim() != 2 or x.shape[1] != self.mu.numel():
            raise ValueError(f"TokenSimilarity.update: x and y must both be [T, {self.mu.numel()}], got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        x64, y64 = x.detach().to("cpu", _F64), y.detach().to("cpu", _F64)
        xs, ys = (x64 - self.mu) / self.sd, (y64 - self.mu) / self.sd
        fx, fy = self._space(x64), self._space(y64)
        s = self.sums
        for key, a, b in (("raw", x64, y64), ("std", xs, ys), ("cap", fx, fy)):
            c = token_cosine64(a, b)
            s[key] += float(torch.nan_to_num(c, nan=0.0).sum())
        s["std_err"] += float((xs - ys).square().sum())
        s["std_spread"] += float(ys.square().sum())
        s["cap_err"] += float((fx - fy).square().sum())
        s["cap_sq"] += float(fy.square().sum())
        self.cap_sum = fy.sum(0) if self.cap_sum is None else self.cap_sum + fy.sum(0)
        self.count += int(x.shape[0])

    def result(self) -> dict[str, float]:
        """Means over tokens: ``cosine`` (raw), ``standardised_cosine``, ``caption_cosine``, and the
        relative errors ``standardised_error`` (Σ|x̃-ỹ|² / Σ|ỹ|², ỹ about the reference mean) and
        ``caption_error`` (Σ|f(x)-f(y)|² / Σ|f(y) - mean f(y)|²); NaN before any token."""
        n, s = self.count, self.sums
        if n == 0:
            return {k: math.nan for k in ("cosine", "standardised_cosine", "caption_cosine",
                                          "standardised_error", "caption_error")}
        spread = s["cap_sq"] - float(self.cap_sum.square().sum()) / n
        return {"cosine": s["raw"] / n, "standardised_cosine": s["std"] / n, "caption_cosine": s["cap"] / n,
                "standardised_error": s["std_err"] / s["std_spread"] if s["std_spread"] > 0 else math.nan,
                "caption_error": s["cap_err"] / spread if spread > 0 else math.nan}


@dataclass(frozen=True)
class DitVerdict:
    """DiT-aware verdict: ``passed`` follows the deciding cosine; ``seeds`` are shown beside it."""

    space: str           # "caption" (with the MODEL) or "standardised"
    cosine: float
    threshold: float
    seeds: Verdict

    @property
    def passed(self) -> bool:
        return bool(self.cosine >= self.threshold)

    def to_markdown(self) -> str:
        mark = "yes" if self.passed else "NO"
        return "\n".join([f"| {self.space}-space cosine | {self.cosine:.4f} | >= {self.threshold:g} | {mark} |",
                          "", "Seeds' criteria (shown, not deciding):", "", self.seeds.to_markdown(), "",
                          f"**DiT-aware verdict: {'PASS' if self.passed else 'FAIL'}**"])


def dit_verdict(seeds: Verdict, standardised_cosine: float, caption_cosine: float | None = None,
                min_cosine: float = DIT_COSINE_MIN) -> DitVerdict:
    """Fail when the caption-space cosine (given the MODEL) or else the standardised cosine is below
    ``min_cosine``; NaN fails. ``seeds`` is :func:`dimfix.compare.verdict`'s result, kept for display."""
    if not isinstance(seeds, Verdict):
        raise TypeError(f"dit_verdict: seeds must be a dimfix.compare.Verdict, got {type(seeds).__name__}")
    if caption_cosine is not None:
        return DitVerdict("caption", float(caption_cosine), float(min_cosine), seeds)
    return DitVerdict("standardised", float(standardised_cosine), float(min_cosine), seeds)
