"""The numerics of :mod:`dimfix.adapter`: the training eigenbasis, held-out moments in it, the ridge and rank paths.

A fit runs in two stages so that at most three ``[D, D]`` float64 matrices are alive, and only while the
training eigenbasis is computed (two afterwards):

1. :class:`TrainBasis` takes the training :class:`~dimfix.pairs.PairSums`, whitens ``C̃xx`` and ``C̃xr``
   (reference-σ units) in place, diagonalises ``C̃xx = Q Λ Qᵀ`` and overwrites ``C̃xr`` with ``P = Qᵀ C̃xr``.
   It also fixes the candidate α (``d = 1/(Λ+λ)`` each) and the low-rank basis ``V`` (top eigenvectors
   of the fitted-value covariance ``M½ Pᵀ diag(d₀) P M½`` at one α₀, see :func:`_top_eigvecs`).
2. :class:`HeldoutMoments` collects what the held-out errors need, already in that basis, either by
   streaming tokens (:meth:`HeldoutMoments.update`) or from held-out sums (:meth:`HeldoutMoments.from_sums`):
   with ``q`` the centred ``Qᵀ x̃`` and ``r̃`` the centred residual, ``rp = Σ w q ∘ (P M r̃)``,
   ``K = Σ w q (r̃ᵀ M U)``, per α ``Σ w |Pᵀ(d ∘ q)|²_M`` and ``Σ w (Zᵀq)(Zᵀq)ᵀ``, the means and
   ``tr(M C̃rr)``, ``tr(M C̃yy)``. Streaming costs one ``[T, D] × [D, D]`` product per token block and α.

:func:`solve` then gets the train and held-out error of every α and every rank in closed form
(see the module docs of :mod:`dimfix.adapter`), picks them by held-out error and builds the maps.
"""

from __future__ import annotations

import math

import scipy.linalg
import torch

from .pairs import PairSums

_F64 = torch.float64
_COND_MAX = 1e10
#: α used when there are no held-out pairs to choose it.
DEFAULT_ALPHA = 1e-2
#: Rows per block of the in-place products and of the streamed held-out tokens (temporaries ``BLOCK × D``).
BLOCK = 128


def _mul_left_(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``a ← m @ a`` in place (square ``m``), one column block at a time."""
    for j in range(0, a.shape[1], BLOCK):
        a[:, j:j + BLOCK] = m @ a[:, j:j + BLOCK]
    return a


def _mul_right_(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``a ← a @ m`` in place (square ``m``), one row block at a time."""
    for i in range(0, a.shape[0], BLOCK):
        a[i:i + BLOCK] = a[i:i + BLOCK] @ m
    return a


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
        _, vec = torch.linalg.eigh(apply(torch.eye(dim, dtype=_F64)))
        return vec.flip(-1)[:, :r].contiguous()
    g = torch.Generator().manual_seed(0)
    basis = _orthonormal(torch.randn(dim, k, dtype=_F64, generator=g))
    for _ in range(passes):
        basis = _orthonormal(apply(basis))
    _, vec = torch.linalg.eigh(basis.T @ apply(basis))
    return (basis @ vec.flip(-1)[:, :r]).contiguous()


class _Metric:
    """The error metric ``M = BᵀB`` in whitened coordinates (``B = A·diag(σ)``), or the identity."""

    def __init__(self, factor: torch.Tensor | None, sig: torch.Tensor) -> None:
        self.b = None if factor is None else factor * sig[None, :]
        self.m = self.vec = self.ev = None
        if self.b is not None:
            self.m = self.b.T @ self.b
            ev, self.vec = torch.linalg.eigh(self.m)
            self.ev = ev.clamp(min=float(ev.max()) * 1e-12)

    def mul(self, z: torch.Tensor) -> torch.Tensor:  # z @ M (rows)
        return z if self.m is None else z @ self.m

    def power(self, v: torch.Tensor, p: float) -> torch.Tensor:  # M^p v (columns)
        return v if self.m is None else self.vec @ (self.ev.pow(p)[:, None] * (self.vec.T @ v))

    def norm2_rows(self, z: torch.Tensor) -> torch.Tensor:  # |z_t|²_M per row
        return (z * z).sum(-1) if self.b is None else (z @ self.b.T).square().sum(-1)

    def trace(self, c: torch.Tensor) -> float:  # tr(M C) for a [D, D] matrix C
        return float(c.diagonal().sum()) if self.m is None else float(torch.dot(self.m.reshape(-1), c.reshape(-1)))


def _whiten(s: PairSums, mu: torch.Tensor, sig: torch.Tensor, metric: _Metric, consume: bool) -> dict:
    """Whitened means, traces and (``C̃xx``, ``C̃xr``) of one PairSums; ``consume`` reuses its matrices."""
    cxx, cxr = (s.cxx, s.cxy) if consume else (s.cxx.clone(), s.cxy.clone())
    if consume:
        s.cxx = s.cxy = None
        s.full = False
    cxr.sub_(cxx)
    for c in (cxx, cxr):
        c.div_(sig[:, None]).div_(sig[None, :])
    if metric.m is None:
        tr_yy, tr_rr = float((s.dyy / sig ** 2).sum()), float(((s.dyy - 2 * s.dxy + s.dxx) / sig ** 2).sum())
    else:  # tr(M C̃rr) = tr(M C̃yy) - 2 tr(M C̃xr) - tr(M C̃xx)
        tr_yy = s.qyy
        tr_rr = s.qyy - 2 * metric.trace(cxr) - metric.trace(cxx)
    return dict(count=s.count, n=s.n, mx=(s.mean_x - mu) / sig, mr=(s.mean_y - s.mean_x) / sig,
                tr_yy=tr_yy, tr_rr=tr_rr, cxx=cxx, cxr=cxr)


class TrainBasis:
    """Stage 1 of a fit (see the module docs). Raises ``LinAlgError`` when the eigensolver fails."""

    def __init__(self, train: PairSums, mu: torch.Tensor, sig: torch.Tensor, ranks: tuple[int, ...],
                 alphas: tuple[float, ...], heldout: bool, consume: bool) -> None:
        self.dim, self.mu, self.sig = train.dim, mu, sig
        self.metric = _Metric(train.metric_factor, sig)
        self.raw_mx, self.raw_my = train.mean_x.clone(), train.mean_y.clone()
        side = _whiten(train, mu, sig, self.metric, consume)
        self.count, self.n, self.mx, self.mr = side["count"], side["n"], side["mx"], side["mr"]
        self.tr_yy, self.tr_rr = side["tr_yy"], side["tr_rr"]
        cxx, p = side["cxx"], side["cxr"]
        w_lam, w_q = scipy.linalg.eigh(cxx.numpy().T, overwrite_a=True, check_finite=False, driver="evr")
        del cxx, side
        self.lam = torch.from_numpy(w_lam).clamp(min=0.0)
        self.q = torch.from_numpy(w_q.T).T  # Fortran-ordered eigenvectors as a view: no copy
        self.p = _mul_left_(p, self.q.T)    # P = Qᵀ C̃xr, in the buffer of C̃xr
        self.notes: list[str] = []
        self.alphas = [float(a) for a in (alphas if heldout or len(alphas) == 1 else (DEFAULT_ALPHA,))]
        cond = float(self.lam[-1] / self.lam[0]) if float(self.lam[0]) > 0 else math.inf
        if cond > _COND_MAX and 0.0 in self.alphas:
            self.alphas = [a for a in self.alphas if a > 0] or [DEFAULT_ALPHA]
            self.notes.append(f"ill-conditioned inputs (condition number {cond:.3g}): unregularised fit excluded")
        self.mean_eig = float(self.lam.sum()) / self.dim
        self.gdiag = torch.cat([(pb * self.metric.mul(pb)).sum(1) for pb in self.p.split(BLOCK)])
        self.ranks = sorted({int(r) for r in ranks if 1 <= int(r) <= min(self.dim, max(1, self.count // 2))}) or [1]
        a0 = self.alphas[0] if len(self.alphas) == 1 else DEFAULT_ALPHA
        d0 = self.d(a0)

        def fitted_cov(v: torch.Tensor) -> torch.Tensor:  # v ↦ M½ Pᵀ diag(d₀) P M½ v, never formed as [D, D]
            w = self.metric.power(v, 0.5)
            return self.metric.power(self.p.T @ (d0[:, None] * (self.p @ w)), 0.5)

        self.v = _top_eigvecs(fitted_cov, self.dim, max(self.ranks))
        self.u_all = self.metric.power(self.v, -0.5)  # U = M^-½ V (whitened); V itself without a metric
        self.mhv = self.metric.power(self.v, 0.5)     # M½ V
        self.mu_all = self.u_all if self.metric.m is None else self.metric.m @ self.u_all  # M U
        self.umu = self.u_all.T @ self.mu_all  # Uᵀ M U

    def d(self, alpha: float) -> torch.Tensor:
        return 1.0 / (self.lam + alpha * self.mean_eig)



class HeldoutMoments:
    """Stage 2: held-out moments in the training basis (see the module docs); float64, mergeable per chunk.

    Per candidate α (``d = 1/(Λ+λ)``) it keeps ``quad[α] = Σ w |Pᵀ(d ∘ q)|²_M`` and
    ``zz[α] = Σ w (Zᵀq)(Zᵀq)ᵀ`` with ``Z = diag(d) P M½ V`` (``[kmax, kmax]``), so no ``[D, D]`` matrix
    of held-out moments is ever formed; ``q`` is the centred ``Qᵀ x̃`` and the chunks merge exactly (Chan).
    """

    def __init__(self, basis: TrainBasis) -> None:
        dim, k, na = basis.dim, basis.mhv.shape[1], len(basis.alphas)
        self.basis = basis
        self.count, self.n, self.tr_rr, self.tr_yy = 0, 0.0, 0.0, 0.0
        self.mx, self.mr, self.my = (torch.zeros(dim, dtype=_F64) for _ in range(3))
        self.rp = torch.zeros(dim, dtype=_F64)
        self.k = torch.zeros((dim, k), dtype=_F64)
        self.quad = torch.zeros(na, dtype=_F64)
        self.zz = torch.zeros((na, k, k), dtype=_F64)

    def update(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add aligned held-out pairs ``[T, D]`` (float64 on the CPU, finite; weights > 0 or None)."""
        b = self.basis
        w = torch.ones(x.shape[0], dtype=_F64) if weight is None else weight
        for i in range(0, x.shape[0], BLOCK):
            ws = w[i:i + BLOCK]
            xs, ys = (x[i:i + BLOCK] - b.mu).div_(b.sig), (y[i:i + BLOCK] - b.mu).div_(b.sig)
            nb = float(ws.sum())
            cx, cy = (ws @ xs) / nb, (ws @ ys) / nb
            tot = self.n + nb
            f = self.n * nb / tot
            dx, dy = cx - self.mx, cy - self.my
            dr, dq = dy - dx, dx @ b.q
            self.tr_yy += float(ws @ b.metric.norm2_rows(ys.sub_(cy))) + f * float(b.metric.norm2_rows(dy))
            rs = ys.sub_(xs.sub_(cx))  # the centred residual, in the buffer of ys
            self.tr_rr += float(ws @ b.metric.norm2_rows(rs)) + f * float(b.metric.norm2_rows(dr))
            q = xs @ b.q
            del xs
            self.k.addmm_(q.T, (rs @ b.mu_all) * ws[:, None]).addr_(dq, dr @ b.mu_all, alpha=f)
            self.rp += ws @ (q * (b.metric.mul(rs) @ b.p.T)) + f * dq * (b.metric.mul(dr) @ b.p.T)
            del rs
            for j, a in enumerate(b.alphas):
                d = b.d(a)
                yq, ym = (q * d) @ b.p, (dq * d) @ b.p  # Pᵀ (d ∘ q) per token, and for the mean shift
                self.quad[j] += float(ws @ b.metric.norm2_rows(yq)) + f * float(b.metric.norm2_rows(ym))
                zq, zm = yq @ b.mhv, ym @ b.mhv
                self.zz[j].addmm_(zq.T, zq * ws[:, None]).addr_(zm, zm, alpha=f)
            self.mx, self.my = self.mx + dx * (nb / tot), self.my + dy * (nb / tot)
            self.mr = self.my - self.mx
            self.n, self.count = tot, self.count + int(ws.numel())

    @classmethod
    def from_sums(cls, basis: TrainBasis, held: PairSums, consume: bool) -> "HeldoutMoments":
        """The same moments from held-out pair sums (``consume`` reuses their matrices)."""
        b = basis
        side = _whiten(held, b.mu, b.sig, b.metric, consume)
        out = cls(b)
        out.count, out.n, out.tr_rr, out.tr_yy = side["count"], side["n"], side["tr_rr"], side["tr_yy"]
        out.mx, out.mr = side["mx"], side["mr"]
        out.my = out.mr + out.mx
        h = _mul_left_(_mul_right_(side["cxx"], b.q), b.q.T)  # Ĥ = Qᵀ C̃xx Q in place
        r = _mul_left_(side["cxr"], b.q.T)                     # R = Qᵀ C̃xr in place
        del side
        out.rp = torch.cat([(rb * b.metric.mul(pb)).sum(1) for rb, pb in zip(r.split(BLOCK), b.p.split(BLOCK))])
        out.k = r @ b.mu_all
        del r
        dmat = torch.stack([b.d(a) for a in b.alphas], 1)  # [D, nα]
        for i in range(0, b.dim, BLOCK):  # dᵀ ((P M Pᵀ) ∘ Ĥ) d, one row block of P M Pᵀ at a time
            gh = (b.metric.mul(b.p[i:i + BLOCK]) @ b.p.T).mul_(h[i:i + BLOCK])
            out.quad += (dmat[i:i + BLOCK] * (gh @ dmat)).sum(0)
        pv = b.p @ b.mhv
        for j in range(len(b.alphas)):
            z = dmat[:, j:j + 1] * pv
            out.zz[j] = z.T @ (h @ z)
        return out


def _ridge_path(b: TrainBasis, ho: HeldoutMoments | None) -> list[tuple[float, float, float]]:
    """``[(α, train rel err, held-out rel err)]`` for every candidate α."""
    dmat = torch.stack([b.d(a) for a in b.alphas], 1)  # [D, nα]
    e_tr = ((b.gdiag[:, None] * (dmat * dmat * b.lam[:, None] - 2 * dmat)).sum(0) + b.tr_rr) / b.tr_yy
    if ho is None:
        return [(a, float(e), math.nan) for a, e in zip(b.alphas, e_tr)]
    qv, u = b.q.T @ (ho.mx - b.mx), ho.mr - b.mr
    z = b.p.T @ (dmat * qv[:, None]) - u[:, None]  # [D, nα] mean-shift error
    shift = (z * b.metric.mul(z.T).T).sum(0)
    e_ho = (ho.quad - 2 * (dmat.T @ ho.rp) + ho.tr_rr + ho.n * shift) / ho.tr_yy
    return [(a, float(et), float(eh)) for a, et, eh in zip(b.alphas, e_tr, e_ho)]


def _lowrank_path(b: TrainBasis, ho: HeldoutMoments | None, alpha: float):
    """(best rank, Z, train error, held-out error, path) of ``Δ = U Zᵀ Qᵀ`` with ``Z = diag(d) P M½ V``."""
    pmu = b.p @ b.mu_all  # P M U (the train cross term)
    z_all = (pmu.clone() if b.metric.m is None else b.p @ b.mhv).mul_(b.d(alpha)[:, None])
    qv = zz = None
    if ho is not None:
        qv, zz = b.q.T @ (ho.mx - b.mx), ho.zz[b.alphas.index(alpha)]
    path, best = [], None
    for r in b.ranks:
        z, umu = z_all[:, :r], b.umu[:r, :r]
        e_tr = (float((umu * (z.T @ (b.lam[:, None] * z))).sum()) - 2 * float((z * pmu[:, :r]).sum())
                + b.tr_rr) / b.tr_yy
        e_ho = math.nan
        if ho is not None:
            e = b.u_all[:, :r] @ (z.T @ qv) - (ho.mr - b.mr)
            e_ho = (float((umu * zz[:r, :r]).sum()) - 2 * float((z * ho.k[:, :r]).sum()) + ho.tr_rr
                    + ho.n * float(b.metric.norm2_rows(e))) / ho.tr_yy
        path.append((float(r), e_ho))
        key = e_ho if ho is not None else -r
        if best is None or key < best[0]:
            best = (key, r, e_tr, e_ho)
    _, r, e_tr, e_ho = best
    return r, z_all[:, :r].clone(), e_tr, e_ho, tuple(path)


def solve(b: TrainBasis, ho: HeldoutMoments | None) -> dict[str, dict]:
    """Keyword arguments of the ``adapter`` and ``adapter_lowrank`` fits (the basis and moments are consumed)."""
    notes = list(b.notes)
    if ho is None:
        notes.append(f"no held-out pairs: ridge alpha fixed at {b.alphas[0]:g}, largest rank kept")
    path = _ridge_path(b, ho)
    a, e_tr, e_ho = min(path, key=lambda t: t[2]) if ho is not None else path[0]
    d = b.d(a)
    common = dict(alpha=a, lam=a * b.mean_eig, train_count=b.count, heldout_count=0 if ho is None else ho.count)
    r, z, lr_tr, lr_ho, rpath = _lowrank_path(b, ho, a)
    sig_c = b.sig[:, None]
    low = dict(kind="lowrank", u=(sig_c * b.u_all[:, :r]).float(), v=((b.q @ z) / sig_c).float(),
               mean=b.raw_mx.float(), shift=(b.raw_my - b.raw_mx).float(), rank=r, train_error=lr_tr,
               heldout_error=lr_ho, notes=tuple(notes), path=rpath, **common)
    if b.count < b.dim:
        note = (f"only {b.count} aligned training tokens for width {b.dim}: a full map is underdetermined; "
                f"the adapter uses the rank-{r} fit")
        return {"adapter": {**low, "notes": low["notes"] + (note,)}, "adapter_lowrank": low}
    delta = _mul_left_(b.p.mul_(d[:, None]), b.q).T  # Δ = Pᵀ diag(d) Qᵀ = (Q diag(d) P)ᵀ, in P's buffer
    b.p = b.q = None
    delta.mul_(sig_c).div_(b.sig[None, :])  # raw coordinates: S Δ S⁻¹
    bias = (b.raw_my - b.raw_mx) - delta @ b.raw_mx
    delta.diagonal().add_(1.0)
    full = dict(kind="full", weight=delta.float(), bias=bias.float(), rank=b.dim, train_error=e_tr,
                heldout_error=e_ho, notes=tuple(notes), path=tuple((t[0], t[2]) for t in path), **common)
    return {"adapter": full, "adapter_lowrank": low}
