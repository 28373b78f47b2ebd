"""Learned linear corrections fitted from token-aligned pairs: ``adapter`` and ``adapter_lowrank``.

- ``adapter``:          ``x' = W x + b``                   (``W`` ``[D, D]``, ``b`` ``[D]``)
- ``adapter_lowrank``:  ``x' = x + U Vᵀ (x - μ) + c``      (``U``, ``V`` ``[D, r]``, ``μ``, ``c`` ``[D]``)

Both are fitted by :func:`fit_adapters` from two :class:`~dimfix.pairs.PairSums` (training prompts
and held-out prompts, split by :func:`~dimfix.pairs.is_heldout`), never from token matrices.

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
reported relative to the reference's own spread ``tr(M C̃yy)`` of the same tokens.

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

from .pairs import PairSums

_F64 = torch.float64
ALPHAS = (0.0, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
RANKS = (4, 8, 16, 32, 64, 128, 256)
#: α used when there are no held-out pairs to choose it.
DEFAULT_ALPHA = 1e-2
_COND_MAX = 1e10

__all__ = ["AdapterFit", "fit_adapters", "apply_affine", "apply_lowrank", "ALPHAS", "RANKS"]


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
@dataclass
class _Side:
    """Whitened quantities of one PairSums (training or held-out)."""

    count: int
    n: float
    mx: torch.Tensor      # whitened mean of x
    mr: torch.Tensor      # whitened mean of the residual y - x
    tr_yy: float          # tr(M C̃yy)
    tr_rr: float          # tr(M C̃rr)
    cxx: torch.Tensor | None
    cxr: torch.Tensor | None


def _side(s: PairSums, mu: torch.Tensor, sig: torch.Tensor, consume: bool) -> _Side:
    a = s.metric_factor
    if a is None:
        tr_yy = float((s.dyy / sig ** 2).sum())
        tr_rr = float(((s.dyy - 2 * s.dxy + s.dxx) / sig ** 2).sum())
    else:
        m = a.T @ a
        tr_yy = s.qyy
        tr_rr = s.qyy - 2 * float(torch.dot(m.reshape(-1), s.cxy.reshape(-1))) \
            + float(torch.dot(m.reshape(-1), s.cxx.reshape(-1))) if s.full else math.nan
        del m
    cxx = cxr = None
    if s.full:
        cxx, cxr = (s.cxx, s.cxy) if consume else (s.cxx.clone(), s.cxy.clone())
        if consume:
            s.cxx = s.cxy = None
            s.full = False
        cxr.sub_(cxx)
        for c in (cxx, cxr):
            c.div_(sig[:, None]).div_(sig[None, :])
    return _Side(s.count, s.n, (s.mean_x - mu) / sig, (s.mean_y - s.mean_x) / sig, tr_yy, tr_rr, cxx, cxr)


def _metric(train: PairSums, sig: torch.Tensor) -> torch.Tensor | None:
    if train.metric_factor is None:
        return None
    b = train.metric_factor * sig[None, :]
    return b.T @ b


def _mnorm2(z: torch.Tensor, m: torch.Tensor | None) -> float:
    return float(z @ z) if m is None else float(z @ (m @ z))


def _ridge_path(tr: _Side, ho: _Side | None, lam: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                m: torch.Tensor | None, alphas: list[float]) -> tuple[list[tuple[float, float, float]], dict]:
    """``[(α, train rel err, held-out rel err)]`` for every α, plus the held-out terms reused later."""
    pm = p if m is None else p @ m
    gdiag = (p * pm).sum(1)
    held = {}
    if ho is not None:
        hq = ho.cxx @ q
        ho.cxx = None  # free each [D, D] buffer as soon as it is used (peak memory)
        held["h"] = q.T @ hq
        del hq
        rr = q.T @ ho.cxr
        ho.cxr = None
        held["rp"] = (rr * pm).sum(1)
        held["rmat"] = rr
        hg = pm @ p.T
        hg.mul_(held["h"])
        held["qv"] = q.T @ (ho.mx - tr.mx)
        held["u"] = ho.mr - tr.mr
    mean_eig = float(lam.clamp(min=0).sum()) / lam.numel()
    out = []
    for a in alphas:
        d = 1.0 / (lam + a * mean_eig)
        e_tr = (float((gdiag * (d * d * lam - 2 * d)).sum()) + tr.tr_rr) / tr.tr_yy
        e_ho = math.nan
        if ho is not None:
            z = p.T @ (d * held["qv"]) - held["u"]
            e_ho = (float(d @ (hg @ d)) - 2 * float(d @ held["rp"]) + ho.tr_rr + ho.n * _mnorm2(z, m)) / ho.tr_yy
        out.append((a, e_tr, e_ho))
    held["pm"] = pm
    return out, held


def _lowrank_errors(tr: _Side, ho: _Side | None, lam: torch.Tensor, p: torch.Tensor, pm: torch.Tensor,
                    held: dict, u: torch.Tensor, z: torch.Tensor, m: torch.Tensor | None) -> tuple[float, float]:
    """Relative (train, held-out) errors of ``Δ = U Zᵀ Qᵀ`` (whitened residual map)."""
    umu = u.T @ u if m is None else u.T @ (m @ u)
    e_tr = (float((umu * (z.T @ (lam[:, None] * z))).sum()) - 2 * float((z * (pm @ u)).sum()) + tr.tr_rr) / tr.tr_yy
    if ho is None:
        return e_tr, math.nan
    rm = held["rmat"] if m is None else held["rmat"] @ m
    e = u @ (z.T @ held["qv"]) - held["u"]
    e_ho = (float((umu * (z.T @ (held["h"] @ z))).sum()) - 2 * float((z * (rm @ u)).sum())
            + ho.tr_rr + ho.n * _mnorm2(e, m)) / ho.tr_yy
    return e_tr, e_ho


def _sqrt_metric(m: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if m is None:
        return None, None
    ev, vec = torch.linalg.eigh(m)
    ev = ev.clamp(min=float(ev.max()) * 1e-12)
    return (vec * ev.sqrt()) @ vec.T, (vec * ev.rsqrt()) @ vec.T


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` (tall): Cholesky-QR twice (matrix products only),
    Householder QR when the columns are (numerically) dependent."""
    q = y
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.T @ q)
        if int(info) != 0:
            return torch.linalg.qr(y).Q
        q = torch.linalg.solve_triangular(chol, q.T, upper=False).T
    return q


def _top_eigvecs(apply, dim: int, r: int, oversample: int = 16, passes: int = 8) -> torch.Tensor:
    """Top-``r`` eigenvectors (descending) of the symmetric PSD operator ``apply`` on R^dim: exact for
    small ``dim``, else randomized subspace iteration (``passes`` products with ``r + oversample``
    columns, then Rayleigh-Ritz), which needs no ``[D, D]`` matrix."""
    k = r + oversample
    if k >= dim:
        ev, vec = torch.linalg.eigh(apply(torch.eye(dim, dtype=_F64)))
        return vec.flip(-1)[:, :r].contiguous()
    g = torch.Generator().manual_seed(0)
    basis = _orthonormal(torch.randn(dim, k, dtype=_F64, generator=g))
    for _ in range(passes):
        basis = _orthonormal(apply(basis))
    ev, vec = torch.linalg.eigh(basis.T @ apply(basis))
    return (basis @ vec.flip(-1)[:, :r]).contiguous()


def _fit_lowrank(tr: _Side, ho: _Side | None, lam: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                 d: torch.Tensor, held: dict, m: torch.Tensor | None, ranks: list[int]):
    """Reduced-rank solution in the metric for each rank (top eigenvectors of the fitted-value
    covariance, see :func:`_top_eigvecs`); returns (best rank, U, Z, errors, path)."""
    m_half, m_ihalf = _sqrt_metric(m)

    def fitted_cov(v: torch.Tensor) -> torch.Tensor:  # v ↦ M½ Pᵀ diag(d) P M½ v, never formed as [D, D]
        w = v if m_half is None else m_half @ v
        w = p.T @ (d[:, None] * (p @ w))
        return w if m_half is None else m_half @ w

    vtop = _top_eigvecs(fitted_cov, p.shape[0], max(ranks))
    u_all = vtop if m_ihalf is None else m_ihalf @ vtop
    z_all = d[:, None] * (p @ (vtop if m_half is None else m_half @ vtop))
    path, best = [], None
    for r in ranks:
        u, z = u_all[:, :r], z_all[:, :r]
        e_tr, e_ho = _lowrank_errors(tr, ho, lam, p, held["pm"], held, u, z, m)
        path.append((float(r), e_ho))
        key = e_ho if ho is not None else -r
        if best is None or key < best[0]:
            best = (key, r, e_tr, e_ho)
    _, r, e_tr, e_ho = best
    return r, u_all[:, :r].clone(), z_all[:, :r].clone(), e_tr, e_ho, tuple(path)


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


def _check(train: PairSums, held: PairSums | None, ref_mean: torch.Tensor, ref_std: torch.Tensor):
    if not isinstance(train, PairSums):
        raise TypeError(f"fit_adapters: train must be a PairSums, got {type(train).__name__}")
    train.flush()
    if held is not None and (not isinstance(held, PairSums) or held.dim != train.dim):
        raise ValueError("fit_adapters: held must be a PairSums of the same width as train (or None)")
    if held is not None:
        held.flush()
    if held is not None and (held.metric_factor is None) != (train.metric_factor is None):
        raise ValueError("fit_adapters: train and held sums must use the same metric factor")
    mu = torch.as_tensor(ref_mean).detach().to("cpu", _F64).reshape(-1)
    sd = torch.as_tensor(ref_std).detach().to("cpu", _F64).reshape(-1)
    if mu.numel() != train.dim or sd.numel() != train.dim:
        raise ValueError(f"fit_adapters: ref_mean and ref_std must have {train.dim} entries (the width), got "
                         f"{mu.numel()} and {sd.numel()}")
    if not (torch.isfinite(mu).all() and torch.isfinite(sd).all()):
        raise ValueError("fit_adapters: ref_mean / ref_std contain NaN or inf")
    med = float(sd.median())
    floor = max(1e-6 * med, torch.finfo(_F64).tiny) if med > 0 else 1.0
    return mu, sd.clamp(min=floor)


def fit_adapters(train: PairSums, held: PairSums | None, ref_mean: torch.Tensor, ref_std: torch.Tensor, *,
                 ranks: tuple[int, ...] = RANKS, alphas: tuple[float, ...] = ALPHAS,
                 consume: bool = False) -> dict[str, AdapterFit]:
    """Fit ``{"adapter": ..., "adapter_lowrank": ...}`` from training and held-out pair sums.

    ``ref_mean``/``ref_std`` (``[D]``) define the reference-σ units (σ is floored at 1e-6 × its
    median). ``ranks``: candidate ranks of the low-rank fit (capped by the data), chosen by held-out
    error like α (without held-out pairs: α = :data:`DEFAULT_ALPHA`, or the only candidate given,
    and the largest rank). ``consume=True`` reuses the sums' ``[D, D]`` matrices as workspace (about three
    fewer ``D²`` float64 buffers; the sums lose their matrices). See the module docs for fallbacks.
    """
    mu, sig = _check(train, held, ref_mean, ref_std)
    dim = train.dim
    if held is not None and held.count == 0:
        held = None
    h_count = 0 if held is None else held.count
    if train.count < 2:
        note = f"only {train.count} aligned training token(s): no correction fitted (identity)"
        return {"adapter": _identity(dim, note), "adapter_lowrank": _identity(dim, note)}
    if not train.full or (held is not None and not held.full):
        note = "the pair sums hold no [D, D] matrices (full=False): per-dim least-squares fit instead"
        fit = _per_dim(train, sig, note, h_count)
        return {"adapter": fit, "adapter_lowrank": fit}
    try:
        out = _solve(train, held, mu, sig, ranks, alphas, consume)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, RuntimeError) as err:
        note = f"the linear solve failed ({err}); per-dim least-squares fit instead"
        fit = _per_dim(train, sig, note, h_count)
        return {"adapter": fit, "adapter_lowrank": fit}
    for key, fit in out.items():
        tensors = [t for t in (fit.weight, fit.bias, fit.u, fit.v, fit.mean, fit.shift) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            out[key] = _per_dim(train, sig, f"{key}: the fit gave non-finite values; per-dim least-squares "
                                            f"fit instead", h_count)
    return out


def _solve(train: PairSums, held: PairSums | None, mu: torch.Tensor, sig: torch.Tensor,
           ranks: tuple[int, ...], alphas: tuple[float, ...], consume: bool) -> dict[str, AdapterFit]:
    dim, notes = train.dim, []
    m = _metric(train, sig)
    raw_mx, raw_my = train.mean_x.clone(), train.mean_y.clone()
    tr = _side(train, mu, sig, consume)
    ho = None if held is None else _side(held, mu, sig, consume)
    if ho is None:
        notes.append(f"no held-out pairs: ridge alpha fixed at {DEFAULT_ALPHA if len(alphas) > 1 else alphas[0]:g}, "
                     f"largest rank kept")
    w_lam, w_q = scipy.linalg.eigh(tr.cxx.numpy().T, overwrite_a=True, check_finite=False, driver="evd")
    tr.cxx = None
    lam, q = torch.from_numpy(w_lam).clamp(min=0.0), torch.from_numpy(np.ascontiguousarray(w_q))
    del w_q
    p = q.T @ tr.cxr
    tr.cxr = None
    alist = [float(a) for a in (alphas if ho is not None or len(alphas) == 1 else (DEFAULT_ALPHA,))]
    cond = float(lam[-1] / lam[0]) if float(lam[0]) > 0 else math.inf
    if cond > _COND_MAX and 0.0 in alist:
        alist = [a for a in alist if a > 0] or [DEFAULT_ALPHA]
        notes.append(f"ill-conditioned inputs (condition number {cond:.3g}): unregularised fit excluded")
    path, heldt = _ridge_path(tr, ho, lam, q, p, m, alist)
    a, e_tr, e_ho = min(path, key=lambda t: t[2]) if ho is not None else path[0]
    lam_abs = a * float(lam.sum()) / dim
    d = 1.0 / (lam + lam_abs)
    common = dict(alpha=a, lam=lam_abs, train_count=tr.count, heldout_count=0 if ho is None else ho.count)
    rank_list = sorted({int(r) for r in ranks if 1 <= int(r) <= min(dim, max(1, tr.count // 2))}) or [1]
    r, u, z, lr_tr, lr_ho, rpath = _fit_lowrank(tr, ho, lam, q, p, d, heldt, m, rank_list)
    del heldt
    sig_c = sig[:, None]
    low = AdapterFit("lowrank", u=(sig_c * u).float(), v=((q @ z) / sig_c).float(), mean=raw_mx.float(),
                     shift=(raw_my - raw_mx).float(), rank=r, train_error=lr_tr, heldout_error=lr_ho,
                     notes=tuple(notes), path=rpath, **common)
    if tr.count < dim:
        note = (f"only {tr.count} aligned training tokens for width {dim}: a full map is underdetermined; "
                f"the adapter uses the rank-{r} fit")
        return {"adapter": AdapterFit(**{**low.__dict__, "notes": low.notes + (note,)}), "adapter_lowrank": low}
    delta = (p * d[:, None]).T @ q.T
    del p
    delta.mul_(sig_c).div_(sig[None, :])  # raw coordinates: S Δ S⁻¹
    bias = (raw_my - raw_mx) - delta @ raw_mx
    delta.diagonal().add_(1.0)
    full = AdapterFit("full", weight=delta.float(), bias=bias.float(), rank=dim, train_error=e_tr,
                      heldout_error=e_ho, notes=tuple(notes), path=tuple((t[0], t[2]) for t in path), **common)
    return {"adapter": full, "adapter_lowrank": low}
