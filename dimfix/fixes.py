"""Fix modes: per-dimension corrections of a [..., T, D] embedding from a fix table.

Every mode is planned once per table (:func:`plan_fix`) as per-dim float32 ``scale``, ``shift`` and
optional value bounds ``lo``/``hi``; applying a plan (:func:`apply_plan`) is ``x*scale + shift``
followed by the optional clamp, computed in float32 and returned in the input dtype, never in place.
The table's *target* statistics describe the embedding being fixed; its *reference* statistics
describe what the DiT expects.

Legacy modes (the original research's ``apply_fixes``, reproduced exactly with table statistics in
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
result (1). Outlier/dead/hyperactive classes use the table's thresholds unless others are passed; the
hyperactive rule here uses the *lower* median σ (``torch.median``, as the original research did), while
the analysis report (``dimfix.compare``) uses the true median, so for an even dim count a dim within a
hair of the threshold can be listed by one and not the other.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field

import torch

from . import rules, tokens
from .config import Thresholds
from .fixtable import FixTable

log = logging.getLogger(__name__)

SEED_MODES = ("none", "rescale", "mask", "clamp", "full")
IMPROVED_MODES = ("affine", "mask_mean", "clamp_pct")
MODES = SEED_MODES + IMPROVED_MODES
SCOPES = ("all", "content", "no_sink")

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
    """Outlier (two-sided std ratio), dead and hyperactive dims of the table, in float64."""
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

    ``scale``/``shift``/``lo``/``hi`` are float32 [D] (bounds are ±inf where a dim is not clamped);
    ``dims`` (int64) lists the dims whose values can change. ``mix`` < 1 blends the clamped result
    with the input (``x + mix·(y - x)``) for partial strength of clamping modes; strengths of
    unclamped modes are folded into ``scale``/``shift``. ``notes`` explain fallbacks.
    """

    mode: str
    strength: float
    scale: torch.Tensor
    shift: torch.Tensor
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    mix: float = 1.0
    notes: tuple[str, ...] = ()
    dims: torch.Tensor = field(init=False)
    _k: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.lo is None) != (self.hi is None):
            raise ValueError("a fix plan needs both bounds lo and hi, or neither")
        affine = (self.scale != 1) | (self.shift != 0)
        bounded = torch.zeros_like(affine)
        k: dict = {"aff": torch.nonzero(affine).flatten(), "lo_id": None, "hi_id": None}
        if self.lo is not None:
            bounded = torch.isfinite(self.lo) | torch.isfinite(self.hi)
            if bool((bounded & ~affine).any()):
                # Bounds on untouched dims can be applied to x directly (exact: y = x there).
                inf = torch.full_like(self.lo, float("inf"))
                k["lo_id"], k["hi_id"] = torch.where(affine, -inf, self.lo), torch.where(affine, inf, self.hi)
        k["bnd"] = torch.nonzero(bounded).flatten()
        # Per-index slices for the gather/scatter path (precomputed: indexing costs as much as a small fix).
        aff, bnd = k["aff"], k["bnd"]
        k["aff_scale"], k["aff_shift"] = self.scale[aff], self.shift[aff]
        k["no_shift"] = not bool(k["aff_shift"].any())
        if self.lo is not None:
            k["aff_lo"], k["aff_hi"], k["bnd_lo"], k["bnd_hi"] = self.lo[aff], self.hi[aff], self.lo[bnd], self.hi[bnd]
        object.__setattr__(self, "dims", torch.nonzero(affine | bounded).flatten())
        object.__setattr__(self, "_k", k)

    @property
    def dim(self) -> int:
        return int(self.scale.shape[0])

    def to(self, device: torch.device | str) -> "FixPlan":
        """The same plan with its tensors on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return FixPlan(mode=self.mode, strength=self.strength, scale=mv(self.scale), shift=mv(self.shift),
                       lo=mv(self.lo), hi=mv(self.hi), mix=self.mix, notes=self.notes)

    @property
    def is_identity(self) -> bool:
        return self.dims.numel() == 0 or self.mix == 0.0


def _check_strength(strength: float) -> float:
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return s


def _percentile_bounds(table: FixTable, th: Thresholds) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    lo, hi = table.percentile("reference", 0.1), table.percentile("reference", 99.9)
    if lo is not None and hi is not None:
        return lo.double(), hi.double(), ()
    mu, sd = table.reference_mean.double(), table.reference_std.double()
    note = (f"the table has no reference percentiles p0.1/p99.9; clamping to reference mean ± "
            f"{th.clamp_sigma:g}·std instead")
    log.warning(note)
    return mu - th.clamp_sigma * sd, mu + th.clamp_sigma * sd, (note,)


def plan_fix(table: FixTable, mode: str, strength: float = 1.0, thresholds: Thresholds | None = None) -> FixPlan:
    """Precompute the per-dim fix of ``mode`` for ``table`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"fix mode must be one of {', '.join(MODES)}; got {mode!r}")
    s = _check_strength(strength)
    th = thresholds or table.meta.thresholds
    d = table.dim
    mu_r, sd_r = table.reference_mean.double(), table.reference_std.double()
    mu_t, sd_t = table.target_mean.double(), table.target_std.double()
    scale = torch.ones(d, dtype=torch.float64)
    shift = torch.zeros(d, dtype=torch.float64)
    lo = hi = None
    notes: tuple[str, ...] = ()
    flags = classify_dims(table, th) if mode not in ("none", "full", "affine") else None
    usable = sd_t > rules.ORIGIN_STD_EPS

    if mode in ("rescale", "mask", "clamp"):
        sel = flags.outlier & usable
        scale[sel] = sd_r[sel] / sd_t[sel]
        if mode in ("mask", "clamp"):  # the origin's dead rule: σ < dead_abs only (no relative rule)
            dead = rules.dead(sd_t, th, absolute_only=True) & ~rules.dead(sd_r, th, absolute_only=True)
            scale[dead] = 0.0
            shift[dead] = 0.0
        if mode == "clamp":
            hyper = flags.target_only_hyper
            lo = torch.full((d,), float("-inf"), dtype=torch.float64)
            hi = torch.full((d,), float("inf"), dtype=torch.float64)
            lo[hyper] = -th.clamp_sigma * sd_r[hyper]
            hi[hyper] = th.clamp_sigma * sd_r[hyper]
    elif mode == "full":
        scale[usable] = sd_r[usable] / sd_t[usable]
        shift[usable] = mu_r[usable] - mu_t[usable] * scale[usable]
    elif mode == "affine":
        degenerate = (sd_t <= th.eps_rel * sd_r) | (sd_t <= 0)
        ok = ~degenerate
        scale[ok] = torch.pow(sd_r[ok] / sd_t[ok], s)
        mean = mu_t + s * (mu_r - mu_t)
        shift = mean - mu_t * scale
    elif mode == "mask_mean":
        sel = flags.outlier | flags.target_only_dead
        scale[sel] = 0.0
        shift[sel] = mu_r[sel]
    elif mode == "clamp_pct":
        sel = flags.outlier & (sd_t > th.eps_rel * sd_r) & (sd_t > 0)
        scale[sel] = sd_r[sel] / sd_t[sel]
        shift[sel] = mu_r[sel] - mu_t[sel] * scale[sel]
        lo, hi, notes = _percentile_bounds(table, th)

    mix = 1.0
    if mode != "affine" and s < 1.0:
        if lo is None:  # (1-s)·x + s·(a·x + b) is still affine
            scale = 1.0 + s * (scale - 1.0)
            shift = s * shift
        else:
            mix = s
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    return FixPlan(mode=mode, strength=s, scale=f32(scale), shift=f32(shift), lo=f32(lo), hi=f32(hi),
                   mix=mix, notes=notes)


def _check_width(x: torch.Tensor, d: int, what: str) -> None:
    if x.ndim < 2:
        raise ValueError(f"expected an embedding of shape [..., T, D], got shape {tuple(x.shape)}")
    if x.shape[-1] != d:
        raise ValueError(f"embedding width {x.shape[-1]} does not match the {what} width {d}")


def _gather_fix(y: torch.Tensor, src: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor | None,
                shift: torch.Tensor | None, lo: torch.Tensor | None, hi: torch.Tensor | None) -> None:
    """``y[..., idx] = clamp(src[..., idx]·scale + shift, lo, hi)`` for a few dims (in place on a new ``y``)."""
    sub = src.index_select(-1, idx)
    if scale is not None:
        sub = torch.addcmul(shift, sub, scale)
    if lo is not None:
        sub = torch.clamp(sub, lo, hi)
    y.index_copy_(-1, idx, sub)


def _apply_all_tokens(xf: torch.Tensor, plan: FixPlan) -> torch.Tensor:
    """The plan on every token of ``xf`` (float32); returns a new tensor, ``xf`` untouched.

    The affine part is one fused pass (as fast as a copy). Bounds on a few dims are gathered,
    clamped and scattered; bounds on many untouched dims are applied while copying (exact there,
    since ``y = x``), with the few changed dims fixed by gather/scatter.
    """
    k = plan._k
    aff, bnd = k["aff"], k["bnd"]
    few = lambda idx: idx.numel() * 8 <= plan.dim  # noqa: E731
    if k["lo_id"] is not None and few(aff) and not few(bnd):
        y = torch.clamp(xf, k["lo_id"], k["hi_id"])
        if aff.numel():
            _gather_fix(y, xf, aff, k["aff_scale"], k["aff_shift"], k["aff_lo"], k["aff_hi"])
    else:
        if not aff.numel():
            y = xf.clone()
        elif k["no_shift"]:  # a plain product is the cheapest pass (legacy rescale/mask/clamp)
            y = torch.mul(xf, plan.scale)
        else:
            y = torch.addcmul(plan.shift, xf, plan.scale)
        if bnd.numel():
            if few(bnd):
                _gather_fix(y, y, bnd, None, None, k["bnd_lo"], k["bnd_hi"])
            else:
                torch.clamp(y, plan.lo, plan.hi, out=y)
    if plan.mix < 1.0:
        y = torch.lerp(xf, y, plan.mix)
    return y


def apply_plan(x: torch.Tensor, plan: FixPlan, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``plan`` to ``x`` [..., T, D]; ``token_mask`` (bool, [T] or x.shape[:-1]) limits the tokens.

    Computes in float32, returns a new tensor of ``x``'s dtype; ``x`` is never modified.
    """
    if token_mask is not None and token_mask.shape[-1] != x.shape[-2]:
        raise ValueError(f"token mask covers {token_mask.shape[-1]} tokens, the embedding has {x.shape[-2]}")
    runs = _token_runs(token_mask) if token_mask is not None and token_mask.ndim == 1 else None
    return _apply(x, plan, token_mask, runs)


def _apply(x: torch.Tensor, plan: FixPlan, token_mask: torch.Tensor | None, runs) -> torch.Tensor:
    """:func:`apply_plan` with the mask's contiguous runs already known (``runs``, or None)."""
    _check_width(x, plan.dim, "fix plan")
    if plan.is_identity:
        return x.clone()
    if plan.scale.device != x.device:
        plan = plan.to(x.device)
    xf = x.to(torch.float32)
    if token_mask is None:
        y = _apply_all_tokens(xf, plan)
    elif runs is not None:  # a few contiguous runs (the Z-Image template's prefix and suffix): slice copies
        included, excluded = runs
        if sum(b - a for a, b in excluded) * 2 <= x.shape[-2]:  # fix everything, restore the excluded runs
            y = _apply_all_tokens(xf, plan)
            for a, b in excluded:
                y.narrow(-2, a, b - a).copy_(xf.narrow(-2, a, b - a))
        else:  # fix only the included runs
            y = xf.clone()
            for a, b in included:
                y.narrow(-2, a, b - a).copy_(_apply_all_tokens(xf.narrow(-2, a, b - a), plan))
    else:
        m = token_mask.to(device=x.device, dtype=torch.bool)
        if m.ndim == 1:
            keep = torch.nonzero(~m).flatten()
            if keep.numel() * 2 <= m.numel():  # fix everything, then restore the few excluded tokens
                y = _apply_all_tokens(xf, plan)
                if keep.numel():
                    y.index_copy_(-2, keep, xf.index_select(-2, keep))
            else:  # fix only the few included tokens
                sel = torch.nonzero(m).flatten()
                y = xf.clone()
                if sel.numel():
                    y.index_copy_(-2, sel, _apply_all_tokens(xf.index_select(-2, sel), plan))
        else:
            y = torch.where(m.unsqueeze(-1), _apply_all_tokens(xf, plan), xf)
    return y.to(x.dtype) if y.dtype != x.dtype else y


_MAX_RUNS = 8


@functools.lru_cache(maxsize=256)
def _runs_of(bits: bytes) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] | None:
    """``(included runs, excluded runs)`` of a bool mask given as bytes, or None when it has many runs."""
    edges = [0] + [i for i in range(1, len(bits)) if bits[i] != bits[i - 1]] + [len(bits)]
    if len(edges) - 1 > 2 * _MAX_RUNS:
        return None
    spans = list(zip(edges[:-1], edges[1:]))
    return (tuple(r for r in spans if bits[r[0]]), tuple(r for r in spans if not bits[r[0]]))


def _token_runs(mask: torch.Tensor):
    """Contiguous runs of a 1-D token mask (memoised by content); None on an accelerator or for many runs."""
    if mask.device.type != "cpu":
        return None
    return _runs_of(mask.to(torch.bool).numpy().tobytes())


@functools.lru_cache(maxsize=64)
def _default_scope_mask(n_tokens: int, scope: str) -> torch.Tensor:
    return tokens.scope_mask(tokens.classify_positions(n_tokens), scope)


@functools.lru_cache(maxsize=64)
def _default_scope_runs(n_tokens: int, scope: str):
    return _token_runs(_default_scope_mask(n_tokens, scope))


def token_mask_for(n_tokens: int, scope: str, labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool mask of the tokens ``scope`` covers (None for ``"all"``); labels default to the Z-Image layout."""
    if scope not in SCOPES:
        raise ValueError(f"token scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    if scope == "all":
        return None
    if labels is None:
        return _default_scope_mask(int(n_tokens), scope).clone()
    if labels.shape[-1] != n_tokens:
        raise ValueError(f"token labels cover {labels.shape[-1]} tokens, the embedding has {n_tokens}")
    return tokens.scope_mask(labels, scope)


def apply_fix(x: torch.Tensor, table: FixTable, mode: str, *, strength: float = 1.0, scope: str = "all",
              labels: torch.Tensor | None = None, thresholds: Thresholds | None = None) -> torch.Tensor:
    """Fix ``x`` [..., T, D] with ``table`` in ``mode`` on the tokens of ``scope``.

    ``scope``: ``"all"``, ``"content"`` (prompt tokens only) or ``"no_sink"``; ``labels`` are
    :class:`dimfix.tokens.TokenClass` values per token (default: Z-Image template positions).
    """
    _check_width(x, table.dim, f"fix table ({table.meta.target_model or 'target'} vs "
                               f"{table.meta.reference_model or 'reference'})")
    return apply_scoped(x, cached_plan(table, mode, strength, thresholds), scope, labels)


def apply_scoped(x: torch.Tensor, plan: FixPlan, scope: str = "all",
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`apply_plan` on the tokens of ``scope`` (labels default to the Z-Image template positions,
    whose masks and their runs are memoised per token count)."""
    if labels is None and scope != "all" and scope in SCOPES:
        n = int(x.shape[-2])
        return _apply(x, plan, _default_scope_mask(n, scope), _default_scope_runs(n, scope))
    return apply_plan(x, plan, token_mask_for(x.shape[-2], scope, labels))


_PLANS: dict[tuple, tuple] = {}
_PLANS_MAX = 32


def cached_plan(table: FixTable, mode: str, strength: float = 1.0, thresholds: Thresholds | None = None) -> FixPlan:
    """:func:`plan_fix` memoised per table object.

    Fix tables are treated as values: to change one, build a new table (or assign new tensors to its
    fields); modifying its tensors in place is not detected. An entry keeps the tensors it was keyed on
    alive, so their ids cannot be reused while it exists.
    """
    named = (table.reference_mean, table.reference_std, table.target_mean, table.target_std,
             *(t for _, t in sorted(table.extras.items())))
    key = (id(table), mode, float(strength), thresholds or table.meta.thresholds, tuple(map(id, named)))
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is table:
        return hit[2]
    plan = plan_fix(table, mode, strength, thresholds)
    while len(_PLANS) >= _PLANS_MAX:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (weakref.ref(table), named, plan)
    return plan
