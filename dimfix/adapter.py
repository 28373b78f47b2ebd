"""Learned linear corrections fitted from token-aligned pairs: ``adapter`` and ``adapter_lowrank``.

- ``adapter``:          ``x' = W x + b``                   (``W`` ``[D, D]``, ``b`` ``[D]``)
- ``adapter_lowrank``:  ``x' = x + U Vᵀ (x - μ) + c``      (``U``, ``V`` ``[D, r]``, ``μ``, ``c`` ``[D]``)

Both are fitted from token-aligned pairs of training and held-out prompts (split by
:func:`~dimfix.pairs.is_heldout`), never from token matrices: :class:`AdapterFitter` streams the
training pairs and then the held-out ones (three ``[D, D]`` float64 matrices at most, 157 MB at
D = 2560); :func:`fit_adapters` takes two finished :class:`~dimfix.pairs.PairSums` (four). The numerics
live in :mod:`dimfix.eigenfit`.

Space. Every dim is expressed in reference-σ units (``x̃ = (x - μ_ref)/σ_ref``, both sides), so the
massive dims (σ ≈ 2750 next to a median of 5.6) do not dominate the fit. The residual ``ỹ - x̃`` is
regressed on ``x̃`` with a ridge penalty ``λ·|Δ|²`` on ``Δ = W̃ - I``: large λ shrinks towards the
identity plus the mean shift, not towards zero. Errors are measured in the metric ``M = I`` (σ
units) or, when the sums carry a metric factor ``A`` (the caption embedder's ``W_cap·diag(g)``), in
``M = AᵀA``. With full-rank ``W`` the least-squares map does not depend on ``M``; λ selection,
reported errors and the rank-``r`` solution (reduced-rank regression in ``M``) do.

Ridge λ = α · tr(C̃xx)/D with α from :data:`ALPHAS`, chosen by the smallest held-out error. The
train and held-out errors of every α come in closed form from the sums and one eigendecomposition
``C̃xx = Q Λ Qᵀ`` (no refit per α): with ``P = Qᵀ C̃xr`` and ``d = 1/(Λ+λ)``,
``err_train = Σ_i (PMPᵀ)_ii (d_i²Λ_i - 2 d_i) + tr(M C̃rr)``, and the held-out error adds the
held-out covariances and the shift of the means (the intercept is the training one). Errors are
reported relative to the reference's own spread ``tr(M C̃yy)`` of the same tokens. The rank-``r``
subspace is taken at one α (the only candidate, else :data:`DEFAULT_ALPHA`) before the held-out pairs
arrive; its ``Z`` uses the chosen α.

Fallbacks (noted in :attr:`AdapterFit.notes`, never a NaN): fewer training tokens than the width
→ the ``adapter`` entry is the low-rank fit; an eigensolver failure or a non-finite result → a
per-dim least-squares fit (target-dead dims go to the reference mean); no pairs → identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from .eigenfit import DEFAULT_ALPHA, HeldoutMoments, TrainBasis, solve
from .pairs import PairSums, check_pairs

_F64 = torch.float64
ALPHAS = (0.0, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
RANKS = (4, 8, 16, 32, 64, 128, 256)

__all__ = ["AdapterFit", "AdapterFitter", "DEFAULT_ALPHA", "fit_adapters", "apply_affine", "apply_lowrank", "ALPHAS",
           "RANKS"]


@dataclass(frozen=True)
class AdapterFit:
    """One fitted correction. ``kind``: ``"full"`` (``weight``/``bias``), ``"lowrank"`` (``u``, ``v``,
    ``mean``, ``shift``), ``"per_dim"`` (diagonal ``weight``/``bias``) or ``"identity"``.

    Errors are relative to the reference spread in the fit metric (NaN when unknown); ``path`` lists
    ``(α or rank, held-out relative error)`` of the candidates tried.
    """

    kind: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    alpha: float = math.nan
    lam: float = math.nan
    rank: int = 0
    train_error: float = math.nan
    heldout_error: float = math.nan
    train_count: int = 0
    heldout_count: int = 0
    notes: tuple[str, ...] = ()
    path: tuple[tuple[float, float], ...] = ()

    def affine(self, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The correction as ``(W [D, D], b [D])`` float32 (``x' = W x + b``) for any kind."""
        if self.kind in ("full", "per_dim"):
            return self.weight, self.bias
        if self.kind == "lowrank":
            uv = self.u.double() @ self.v.double().T
            w = torch.eye(uv.shape[0], dtype=_F64) + uv
            return w.float(), (self.shift.double() - uv @ self.mean.double()).float()
        d = int(dim if dim is not None else (self.bias.numel() if self.bias is not None else 0))
        return torch.eye(d), torch.zeros(d)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to ``x`` ``[..., D]`` (float32 compute, a new tensor of ``x``'s dtype)."""
        if self.kind == "lowrank":
            return apply_lowrank(x, self.u, self.v, self.mean, self.shift)
        if self.kind == "identity":
            return x.clone()
        return apply_affine(x, self.weight, self.bias)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Contiguous float32 tensors for a fix table: ``{name}_weight``/``_bias`` (full, per-dim) or
        ``{name}_u``/``_v``/``_mean``/``_shift`` (low rank); empty for identity."""
        if self.kind == "lowrank":
            parts = {"u": self.u, "v": self.v, "mean": self.mean, "shift": self.shift}
        elif self.kind == "identity":
            parts = {}
        else:
            parts = {"weight": self.weight, "bias": self.bias}
        return {f"{name}_{k}": t.float().contiguous() for k, t in parts.items()}


def apply_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x' = x Wᵀ + b`` for ``x`` ``[..., D]``: one float32 matmul, result in ``x``'s dtype."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"adapter width {weight.shape[1]} does not match the embedding width {x.shape[-1]}")
    xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
    w, b = weight.to(xf.device, torch.float32), bias.to(xf.device, torch.float32)
    y = torch.addmm(b, xf, w.T).reshape(x.shape)
    return y.to(x.dtype) if y.dtype != x.dtype else y


def apply_lowrank(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, mean: torch.Tensor,
                  shift: torch.Tensor) -> torch.Tensor:
    """``x' = x + ((x - μ) V) Uᵀ + c`` for ``x`` ``[..., D]`` (float32, result in ``x``'s dtype)."""
    if x.shape[-1] != u.shape[0]:
        raise ValueError(f"adapter width {u.shape[0]} does not match the embedding width {x.shape[-1]}")
    dev = x.device
    xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
    uf, vf, mf, cf = (t.to(dev, torch.float32) for t in (u, v, mean, shift))
    # (x - μ) V = x V - μ V: no [T, D] temporary for the centring
    low = torch.addmm(-(mf @ vf), xf, vf)
    y = torch.addmm(xf + cf, low, uf.T).reshape(x.shape)
    return y.to(x.dtype) if y.dtype != x.dtype else y


# ---------------------------------------------------------------------------- fitting
_SOLVE_ERRORS = (np.linalg.LinAlgError, scipy.linalg.LinAlgError, RuntimeError)


def _per_dim(train: PairSums, sig: torch.Tensor, note: str, held_count: int) -> AdapterFit:
    """Diagonal least squares per dim (a tiny ridge); target-dead dims map to the reference mean."""
    dxx, dxr = train.dxx / sig ** 2, (train.dxy - train.dxx) / sig ** 2
    ridge = 1e-9 * float(dxx.mean()) + torch.finfo(_F64).tiny
    a = dxr / (dxx + ridge)
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    w = 1.0 + a
    b = train.mean_y - w * train.mean_x
    b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
    return AdapterFit("per_dim", weight=torch.diag(w).float(), bias=b.float(), train_count=train.count,
                      heldout_count=held_count, notes=(note,))


def _identity(dim: int, note: str) -> AdapterFit:
    return AdapterFit("identity", weight=torch.eye(dim), bias=torch.zeros(dim), notes=(note,))


def _units(ref_mean: torch.Tensor, ref_std: torch.Tensor, dim: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-σ units ``(μ, σ)`` as float64 ``[D]`` (σ floored at 1e-6 × its median)."""
    mu = torch.as_tensor(ref_mean).detach().to("cpu", _F64).reshape(-1)
    sd = torch.as_tensor(ref_std).detach().to("cpu", _F64).reshape(-1)
    if mu.numel() != dim or sd.numel() != dim:
        raise ValueError(f"{where}: ref_mean and ref_std must have {dim} entries (the width), got "
                         f"{mu.numel()} and {sd.numel()}")
    if not (torch.isfinite(mu).all() and torch.isfinite(sd).all()):
        raise ValueError(f"{where}: ref_mean / ref_std contain NaN or inf")
    med = float(sd.median())
    floor = max(1e-6 * med, torch.finfo(_F64).tiny) if med > 0 else 1.0
    return mu, sd.clamp(min=floor)


def _check(train: PairSums, held: PairSums | None) -> None:
    if not isinstance(train, PairSums):
        raise TypeError(f"fit_adapters: train must be a PairSums, got {type(train).__name__}")
    train.flush()
    if held is not None and (not isinstance(held, PairSums) or held.dim != train.dim):
        raise ValueError("fit_adapters: held must be a PairSums of the same width as train (or None)")
    if held is not None:
        held.flush()
    if held is not None and (held.metric_factor is None) != (train.metric_factor is None):
        raise ValueError("fit_adapters: train and held sums must use the same metric factor")


def _finish(train: PairSums, basis: TrainBasis | None, held: HeldoutMoments | None, sig: torch.Tensor,
            h_count: int, failure: str | None) -> dict[str, AdapterFit]:
    """The fits from a training basis and held-out moments, or the fallback that applies (see module docs)."""
    if train.count < 2:
        note = f"only {train.count} aligned training token(s): no correction fitted (identity)"
        return {"adapter": _identity(train.dim, note), "adapter_lowrank": _identity(train.dim, note)}
    if basis is None:
        note = failure or "the pair sums hold no [D, D] matrices (full=False): per-dim least-squares fit instead"
        fit = _per_dim(train, sig, note, h_count)
        return {"adapter": fit, "adapter_lowrank": fit}
    try:
        out = {key: AdapterFit(**kw) for key, kw in solve(basis, held).items()}
    except _SOLVE_ERRORS as err:
        fit = _per_dim(train, sig, _failed(err), h_count)
        return {"adapter": fit, "adapter_lowrank": fit}
    for key, fit in out.items():
        tensors = [t for t in (fit.weight, fit.bias, fit.u, fit.v, fit.mean, fit.shift) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            out[key] = _per_dim(train, sig, f"{key}: the fit gave non-finite values; per-dim least-squares "
                                            f"fit instead", h_count)
    return out


def _failed(err: Exception) -> str:
    return f"the linear solve failed ({err}); per-dim least-squares fit instead"


def fit_adapters(train: PairSums, held: PairSums | None, ref_mean: torch.Tensor, ref_std: torch.Tensor, *,
                 ranks: tuple[int, ...] = RANKS, alphas: tuple[float, ...] = ALPHAS,
                 consume: bool = False) -> dict[str, AdapterFit]:
    """Fit ``{"adapter": ..., "adapter_lowrank": ...}`` from training and held-out pair sums.

    ``ref_mean``/``ref_std`` (``[D]``) define the reference-σ units (σ is floored at 1e-6 × its
    median). ``ranks``: candidate ranks of the low-rank fit (capped by the data), chosen by held-out
    error like α (without held-out pairs: α = :data:`DEFAULT_ALPHA`, or the only candidate given,
    and the largest rank). ``consume=True`` reuses the sums' ``[D, D]`` matrices as workspace (the
    sums keep only their diagonals). :class:`AdapterFitter` streams instead and needs less memory.
    See the module docs for fallbacks.
    """
    _check(train, held)
    mu, sig = _units(ref_mean, ref_std, train.dim, "fit_adapters")
    held = None if held is None or held.count == 0 else held
    h_count = 0 if held is None else held.count
    basis = moments = failure = None
    if train.count >= 2 and train.full and (held is None or held.full):
        try:
            basis = TrainBasis(train, mu, sig, ranks, alphas, held is not None, consume)
            moments = None if held is None else HeldoutMoments.from_sums(basis, held, consume)
        except _SOLVE_ERRORS as err:
            basis, failure = None, _failed(err)
    return _finish(train, basis, moments, sig, h_count, failure)


class AdapterFitter:
    """Streaming fit in two stages: every training pair first (:meth:`add_train`), then the held-out pairs
    (:meth:`add_heldout`; the first held-out rows close the training stage), then :meth:`finish`.

    Same results as :func:`fit_adapters` on the same pairs, with at most three ``[D, D]`` float64 matrices
    alive (157 MB at D = 2560; two sums would be four). ``ref_mean``/``ref_std``: the
    reference-σ units; None takes them from the training pairs' reference side (mean and σ of ``y``).
    ``metric_factor``: see :class:`~dimfix.pairs.PairSums`.
    """

    def __init__(self, dim: int, ref_mean: torch.Tensor | None = None, ref_std: torch.Tensor | None = None, *,
                 metric_factor: torch.Tensor | None = None, ranks: tuple[int, ...] = RANKS,
                 alphas: tuple[float, ...] = ALPHAS) -> None:
        if (ref_mean is None) != (ref_std is None):
            raise ValueError("AdapterFitter: give both ref_mean and ref_std, or neither")
        self.train = PairSums(dim, metric_factor=metric_factor)
        self.units = None if ref_mean is None else _units(ref_mean, ref_std, self.train.dim, "AdapterFitter")
        self.ranks, self.alphas = ranks, alphas
        self.stage, self.heldout_count = "train", 0
        self._basis: TrainBasis | None = None
        self._held: HeldoutMoments | None = None
        self._failure: str | None = None

    def add_train(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Training pairs ``[..., D]`` (see :meth:`PairSums.update`); only before any held-out pair."""
        if self.stage != "train":
            raise ValueError("AdapterFitter.add_train: every training pair must come before the held-out pairs "
                             "(order the prompts with dimfix.repair.study_order)")
        self.train.update(x, y, weight)

    def add_heldout(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Held-out pairs ``[..., D]``, accumulated in the training basis (never kept)."""
        if self.stage == "done":
            raise ValueError("AdapterFitter.add_heldout: finish() was already called")
        x64, y64, w = check_pairs(x, y, weight, self.train.dim, "AdapterFitter.add_heldout")
        if x64.shape[0] == 0:
            return
        if self.stage == "train":
            self._close(heldout=True)
        if self._held is not None:
            self._held.update(x64, y64, w)
        self.heldout_count += int(x64.shape[0])

    def _close(self, heldout: bool) -> None:
        self.stage = "heldout"
        t = self.train.flush()
        if self.units is None:
            std = (t.dyy / t.n).sqrt() if t.n > 0 else torch.ones(t.dim, dtype=_F64)
            self.units = _units(t.mean_y, std, t.dim, "AdapterFitter")
        if t.count < 2 or not t.full:
            return
        try:
            self._basis = TrainBasis(t, *self.units, self.ranks, self.alphas, heldout, consume=True)
        except _SOLVE_ERRORS as err:
            self._failure = _failed(err)
            return
        self._held = HeldoutMoments(self._basis)

    def finish(self) -> dict[str, AdapterFit]:
        """``{"adapter": ..., "adapter_lowrank": ...}`` (the fitter is spent afterwards)."""
        if self.stage == "done":
            raise ValueError("AdapterFitter.finish: already called")
        if self.stage == "train":
            self._close(heldout=False)
        self.stage = "done"
        basis, held = self._basis, self._held if self.heldout_count else None
        self._basis = self._held = None
        return _finish(self.train, basis, held, self.units[1], self.heldout_count, self._failure)
