"""Fix modes: per-dimension corrections of a [..., T, D] embedding from a fix table.

Every mode is planned (:func:`plan_fix`) as per-dim float32 ``scale``, ``shift`` and optional value
bounds ``lo``/``hi``; applying a plan (:func:`apply_plan`, the one apply path) is ``x*scale + shift``
followed by the optional clamp, computed in float32 and returned in the input dtype, never in place.
The outlier handling of blending (:func:`outlier_plan`) is a plan of the same kind.
The table's *target* statistics describe the embedding being fixed; its *reference* statistics
describe what the DiT expects.

Origin modes (:data:`ORIGIN_MODES`, the original research's ``apply_fixes``, reproduced exactly with table statistics in
place of the same-prompt "emb"/"qwen3" statistics):

- ``none``: unchanged.
- ``rescale``: outlier dims (σ_tgt/q > τ or < 1/τ, q = σ_ref or 1 when σ_ref < 1e-6) with
  σ_tgt > 1e-6 are multiplied by σ_ref/σ_tgt -- about 0, so their mean is scaled too.
- ``mask``: ``rescale``, then target-only dead dims (σ < ``dead_abs``, the origin's absolute rule) are
  set to 0.
- ``clamp``: ``mask``, then target-only hyperactive dims are clamped to ±clamp_sigma·σ_ref about 0.
- ``full``: every dim with σ_tgt > 1e-6 is mapped ``(x - μ_tgt)/σ_tgt·σ_ref + μ_ref``.

Improved modes:

- ``affine``: every dim is moment-matched about the means,
  ``x' = μ_tgt + λ(μ_ref - μ_tgt) + (x - μ_tgt)·(σ_ref/σ_tgt)^λ`` with λ = ``strength``. At λ = 1
  this is ``μ_ref + (x - μ_tgt)·σ_ref/σ_tgt``; at λ = 0 it is the identity (the mean moves linearly,
  the scale geometrically, so the output σ is σ_tgt^(1-λ)·σ_ref^λ). All dims, not only flagged ones:
  with corpus statistics every dim's moments are measured, and the DiT was trained on all of them.
  Degenerate dims (σ_tgt ≤ eps_rel·σ_ref or σ_tgt == 0) only get the mean shift, so nothing is ever
  divided by ~0.
- ``mask_mean``: outlier dims (two-sided ratio) and target-only dead dims are set to the reference
  *mean* (not 0, which is far off for dims such as 4, mean ≈ 925).
- ``clamp_pct``: outlier dims are first mapped onto the reference (the ``affine`` map at λ = 1), then
  every dim is clamped to the reference's own value range ``[p0.1, p99.9]`` (centred where the
  reference lives, not about 0). Without percentiles in the table, ``μ_ref ± clamp_sigma·σ_ref``
  is used and the plan's ``notes`` say so.

For every mode except ``affine``, ``strength`` interpolates between the input (0) and the fully fixed
result (1). Outlier/dead/hyperactive classes are the rules of :mod:`dimfix.rules` with the table's
thresholds unless others are passed; for parity with the original research the fixes use its ratio
(``σ_tgt/q``) and its lower median (``rules.median(lower=True)``), while the analysis report uses the
relative-epsilon ratio and the true median, so a dim within a hair of a threshold can be listed by one
and not the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import rules, tokens
from .config import Thresholds
from .fixtable import FixTable

log = logging.getLogger(__name__)

#: The original research's modes (its ``apply_fixes``), reproduced exactly.
ORIGIN_MODES = ("none", "rescale", "mask", "clamp", "full")
IMPROVED_MODES = ("affine", "mask_mean", "clamp_pct")
MODES = ORIGIN_MODES + IMPROVED_MODES
#: Outlier handling of :func:`outlier_plan` (blending's secondary).
OUTLIER_MODES = ("none", "mean", "rescale", "clamp")


@dataclass(frozen=True)
class DimFlags:
    """Per-dim boolean classes of a table (all bool [D]); see :func:`classify_dims`."""

    ratio: torch.Tensor  # float64 [D] σ_tgt / q, q = σ_ref (or 1 when σ_ref < 1e-6)
    high: torch.Tensor
    low: torch.Tensor
    target_dead: torch.Tensor
    reference_dead: torch.Tensor
    target_hyper: torch.Tensor
    reference_hyper: torch.Tensor

    @property
    def outlier(self) -> torch.Tensor:
        return self.high | self.low

    @property
    def target_only_dead(self) -> torch.Tensor:
        return self.target_dead & ~self.reference_dead

    @property
    def target_only_hyper(self) -> torch.Tensor:
        return self.target_hyper & ~self.reference_hyper


def classify_dims(table: FixTable, thresholds: Thresholds | None = None) -> DimFlags:
    """Outlier (two-sided std ratio), dead and hyperactive dims of the table (origin rules, float64)."""
    th = thresholds or table.meta.thresholds
    s_ref = table.reference_std.double()
    s_tgt = table.target_std.double()
    ratio = rules.std_ratio(s_tgt, s_ref, origin=True)
    high, low = rules.outliers(ratio, th.outlier_ratio)
    return DimFlags(ratio=ratio, high=high, low=low,
                    target_dead=rules.dead(s_tgt, th, lower=True), reference_dead=rules.dead(s_ref, th, lower=True),
                    target_hyper=rules.hyper(s_tgt, th, lower=True), reference_hyper=rules.hyper(s_ref, th, lower=True))


@dataclass(frozen=True)
class FixPlan:
    """A planned fix: ``y = x*scale + shift``, then ``clamp(y, lo, hi)`` when bounds exist.

    ``scale``/``shift``/``lo``/``hi`` are float32 [D] (bounds are ±inf where a dim is not clamped).
    ``mix`` < 1 blends the clamped result with the input (``x + mix·(y - x)``) for partial strength of
    clamping modes; strengths of unclamped modes are folded into ``scale``/``shift``. ``notes``
    explain fallbacks; ``dims`` (int64) lists the dims whose values can change.
    """

    mode: str
    strength: float
    scale: torch.Tensor
    shift: torch.Tensor
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    mix: float = 1.0
    notes: tuple[str, ...] = ()
    dims: torch.Tensor = field(init=False)  # int64: the dims whose values the plan can change

    def __post_init__(self) -> None:
        if (self.lo is None) != (self.hi is None):
            raise ValueError("a fix plan needs both bounds lo and hi, or neither")
        touched = (self.scale != 1) | (self.shift != 0)
        if self.lo is not None:
            touched |= torch.isfinite(self.lo) | torch.isfinite(self.hi)
        object.__setattr__(self, "dims", torch.nonzero(touched).flatten())

    @property
    def dim(self) -> int:
        return int(self.scale.shape[0])

    @property
    def is_identity(self) -> bool:
        return self.mix == 0.0 or self.dims.numel() == 0

    def to(self, device: torch.device | str) -> "FixPlan":
        """The same plan with its tensors on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FixPlan(mode=self.mode, strength=self.strength, scale=mv(self.scale), shift=mv(self.shift),
                       lo=mv(self.lo), hi=mv(self.hi), mix=self.mix, notes=self.notes)


def _check_strength(strength: float) -> float:
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return s


def _reference_bounds(table: FixTable, th: Thresholds) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The reference's ``[p0.1, p99.9]`` (float64), or ``μ_ref ± clamp_sigma·σ_ref`` with a note."""
    lo, hi = table.percentile("reference", 0.1), table.percentile("reference", 99.9)
    if lo is not None and hi is not None:
        return lo.double(), hi.double(), ()
    mu, sd = table.reference_mean.double(), table.reference_std.double()
    note = (f"the table has no reference percentiles p0.1/p99.9; clamping to reference mean ± "
            f"{th.clamp_sigma:g}·std instead")
    log.warning(note)
    return mu - th.clamp_sigma * sd, mu + th.clamp_sigma * sd, (note,)


class _Draft:
    """Float64 ``scale``/``shift``/bounds of a plan being built (the identity to start with)."""

    def __init__(self, table: FixTable) -> None:
        d = table.dim
        self.mu_r, self.sd_r = table.reference_mean.double(), table.reference_std.double()
        self.mu_t, self.sd_t = table.target_mean.double(), table.target_std.double()
        self.scale = torch.ones(d, dtype=torch.float64)
        self.shift = torch.zeros(d, dtype=torch.float64)
        self.lo = self.hi = None
        self.notes: tuple[str, ...] = ()

    def to_reference(self, sel: torch.Tensor) -> None:
        """Dims ``sel``: ``(x - μ_tgt)·σ_ref/σ_tgt + μ_ref`` (callers exclude σ_tgt ≈ 0)."""
        self.scale[sel] = self.sd_r[sel] / self.sd_t[sel]
        self.shift[sel] = self.mu_r[sel] - self.mu_t[sel] * self.scale[sel]

    def set_to(self, sel: torch.Tensor, value: torch.Tensor | float) -> None:
        """Dims ``sel`` replaced by a constant (``value`` [D] or a number)."""
        self.scale[sel] = 0.0
        self.shift[sel] = value[sel] if isinstance(value, torch.Tensor) else value

    def bound(self, sel: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Dims ``sel`` value-clamped to ``[lo, hi]`` (float64 [D])."""
        if self.lo is None:
            self.lo = torch.full_like(self.scale, float("-inf"))
            self.hi = torch.full_like(self.scale, float("inf"))
        self.lo[sel], self.hi[sel] = lo[sel], hi[sel]

    def plan(self, mode: str, strength: float, fold: bool) -> FixPlan:
        """The float32 plan; ``fold``: a partial strength folded into scale/shift (or, with bounds, ``mix``)."""
        scale, shift, mix = self.scale, self.shift, 1.0
        if fold and strength < 1.0:
            if self.lo is None:  # (1-s)·x + s·(a·x + b) is still affine
                scale, shift = 1.0 + strength * (scale - 1.0), strength * shift
            else:
                mix = strength
        f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
        return FixPlan(mode=mode, strength=strength, scale=f32(scale), shift=f32(shift), lo=f32(self.lo),
                       hi=f32(self.hi), mix=mix, notes=self.notes)


def _origin(p: _Draft, mode: str, table: FixTable, th: Thresholds) -> None:
    usable = p.sd_t > rules.ORIGIN_STD_EPS
    if mode == "full":
        p.to_reference(usable)
        return
    flags = classify_dims(table, th)
    sel = flags.outlier & usable
    p.scale[sel] = p.sd_r[sel] / p.sd_t[sel]  # about 0, as the original research did
    if mode in ("mask", "clamp"):  # the origin's dead rule: σ < dead_abs only (no relative rule)
        p.set_to(rules.dead(p.sd_t, th, absolute_only=True) & ~rules.dead(p.sd_r, th, absolute_only=True), 0.0)
    if mode == "clamp":
        k = th.clamp_sigma * p.sd_r
        p.bound(flags.target_only_hyper, -k, k)


def _improved(p: _Draft, mode: str, strength: float, table: FixTable, th: Thresholds) -> None:
    ok = (p.sd_t > th.eps_rel * p.sd_r) & (p.sd_t > 0)
    if mode == "affine":
        p.scale[ok] = torch.pow(p.sd_r[ok] / p.sd_t[ok], strength)
        p.shift = p.mu_t + strength * (p.mu_r - p.mu_t) - p.mu_t * p.scale
        return
    flags = classify_dims(table, th)
    if mode == "mask_mean":
        p.set_to(flags.outlier | flags.target_only_dead, p.mu_r)
    else:  # clamp_pct
        p.to_reference(flags.outlier & ok)
        lo, hi, p.notes = _reference_bounds(table, th)
        p.bound(torch.ones_like(ok), lo, hi)


def plan_fix(table: FixTable, mode: str, strength: float = 1.0, thresholds: Thresholds | None = None) -> FixPlan:
    """The per-dim fix of ``mode`` for ``table`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"fix mode must be one of {', '.join(MODES)}; got {mode!r}")
    s = _check_strength(strength)
    th = thresholds or table.meta.thresholds
    p = _Draft(table)
    if mode in IMPROVED_MODES:
        _improved(p, mode, s, table, th)
    elif mode != "none":
        _origin(p, mode, table, th)
    return p.plan(mode, s, fold=mode != "affine")


def outlier_plan(table: FixTable, mode: str, thresholds: Thresholds | None = None) -> FixPlan:
    """Blending's treatment of the dims the table flags as outliers (two-sided std ratio).

    ``mean``: set to the reference mean. ``rescale``: scaled about the target's own mean so σ lands
    on the edge of the accepted band (τ·σ_ref for too-wide dims, σ_ref/τ for too-narrow ones).
    ``clamp``: value-clamped to the reference ``[p0.1, p99.9]`` (μ_ref ± clamp_sigma·σ_ref without
    percentiles). ``none``: the identity.
    """
    if mode not in OUTLIER_MODES:
        raise ValueError(f"outlier handling must be one of {', '.join(OUTLIER_MODES)}; got {mode!r}")
    th = thresholds or table.meta.thresholds
    flags = classify_dims(table, th)
    p = _Draft(table)
    if mode == "mean":
        p.set_to(flags.outlier, p.mu_r)
    elif mode == "rescale":
        tau, ok = th.outlier_ratio, p.sd_t > 0
        hi_sel, lo_sel = flags.high & ok, flags.low & ok
        p.scale[hi_sel] = tau * p.sd_r[hi_sel] / p.sd_t[hi_sel]
        p.scale[lo_sel] = p.sd_r[lo_sel] / (tau * p.sd_t[lo_sel])
        sel = hi_sel | lo_sel
        p.shift[sel] = p.mu_t[sel] * (1.0 - p.scale[sel])  # about the target's own mean
    elif mode == "clamp":
        lo, hi, p.notes = _reference_bounds(table, th)
        p.bound(flags.outlier, lo, hi)
    return p.plan(f"outliers:{mode}", 1.0, fold=False)


def apply_plan(x: torch.Tensor, plan: FixPlan, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``plan`` to ``x`` [..., T, D]; ``token_mask`` (bool, [T] or x.shape[:-1]) limits the tokens.

    Computes in float32, returns a new tensor of ``x``'s dtype; ``x`` is never modified. Tokens outside
    the mask are copied back by index (a 1-D mask) or selected by ``torch.where``.
    """
    if x.ndim < 2:
        raise ValueError(f"expected an embedding of shape [..., T, D], got shape {tuple(x.shape)}")
    if x.shape[-1] != plan.dim:
        raise ValueError(f"embedding width {x.shape[-1]} does not match the fix plan's width {plan.dim}")
    if token_mask is not None and token_mask.shape[-1] != x.shape[-2]:
        raise ValueError(f"token mask covers {token_mask.shape[-1]} tokens, the embedding has {x.shape[-2]}")
    if plan.is_identity:
        return x.clone()
    if plan.scale.device != x.device:
        plan = plan.to(x.device)
    xf = x.to(torch.float32)
    y = torch.addcmul(plan.shift, xf, plan.scale)
    if plan.lo is not None:
        torch.clamp(y, plan.lo, plan.hi, out=y)
    if plan.mix < 1.0:
        y = torch.lerp(xf, y, plan.mix)
    if token_mask is not None:
        m = token_mask.to(device=x.device, dtype=torch.bool)
        if m.ndim == 1:
            keep = torch.nonzero(~m).flatten()
            y.index_copy_(-2, keep, xf.index_select(-2, keep))
        else:
            y = torch.where(m.unsqueeze(-1), y, xf)
    return y.to(x.dtype)


def token_mask_for(n_tokens: int, token_scope: str, labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool mask of the tokens ``token_scope`` covers (None for ``"all"``); labels default to the
    Z-Image template positions."""
    if tokens.check_scope(token_scope) == "all":
        return None
    if labels is None:
        labels = tokens.classify_positions(int(n_tokens))
    elif labels.shape[-1] != n_tokens:
        raise ValueError(f"token labels cover {labels.shape[-1]} tokens, the embedding has {n_tokens}")
    return tokens.scope_mask(labels, token_scope)


def apply_scoped(x: torch.Tensor, plan: FixPlan, token_scope: str = "all",
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`apply_plan` on the tokens of ``token_scope`` (``labels``: :class:`dimfix.tokens.TokenClass`
    per token; default: the Z-Image template positions)."""
    return apply_plan(x, plan, token_mask_for(x.shape[-2], token_scope, labels))
