"""Reference-vs-target comparison of per-dimension statistics, classes and the verdict.

Conventions
    - σ is the ``ddof=1`` standard deviation of :class:`~dimfix.stats.DimStats`.
    - Ratios use a *relative* epsilon of the pooled σ of both models: ``eps = eps_rel × median(σ_ref ∪
      σ_tgt)`` (true median of the 2·D values); when that is 0 (mostly constant dims) ``eps = eps_rel ×
      max(σ_ref ∪ σ_tgt)``, and never less than the smallest positive float64. ``ratio = (σ_tgt + eps) /
      (σ_ref + eps)``, so a zero reference σ gives a finite ratio, and since ``eps`` does not depend on
      which model is the reference, ``log_ratio(a, b) = -log_ratio(b, a)`` exactly (symmetric).
    - Index sets (outliers, dead, hyperactive, consistency) are sorted ``list[int]``.
    - Correlations are computed in float64 and returned as Python floats. Constant or empty input
      (or any NaN) gives ``nan`` — like scipy's ``pearsonr``/``spearmanr`` for constant input.
    - A zero-norm token (or per-dim-mean vector) has cosine ``nan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .config import VERDICT_CRITERIA, Thresholds
from .stats import DimStats

_F64 = torch.float64
_TINY = torch.finfo(_F64).tiny

__all__ = [
    "Comparison", "Verdict", "VerdictRow", "compare", "consistency", "log_ratio", "mean_token_cosine",
    "outlier_flags", "pearson", "per_token_cosine", "ratio_eps", "spearman", "std_ratio", "verdict",
]


def _vec(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=_F64).reshape(-1)
    return t


def _median(t: torch.Tensor) -> float:
    """True median (mean of the two middle values for even length), NaN for empty input."""
    if t.numel() == 0:
        return math.nan
    s, _ = torch.sort(t.reshape(-1).to(_F64))
    n = s.numel()
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


# ---------------------------------------------------------------------------- ratios
def ratio_eps(sigma_ref: torch.Tensor, eps_rel: float, sigma_tgt: torch.Tensor | None = None) -> float:
    """The absolute epsilon used by :func:`std_ratio`: of the pooled σ of both models (of ``sigma_ref``
    alone when ``sigma_tgt`` is None); see the module docs."""
    pooled = _vec(sigma_ref) if sigma_tgt is None else torch.cat([_vec(sigma_ref), _vec(sigma_tgt)])
    eps = eps_rel * _median(pooled)
    if not eps > 0:
        eps = eps_rel * float(pooled.max()) if pooled.numel() else 0.0
    return max(eps, _TINY) if math.isfinite(eps) else _TINY


def _shifted(sigma_tgt: torch.Tensor, sigma_ref: torch.Tensor, eps_rel: float,
             what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ_tgt + eps, σ_ref + eps)`` in float64 after checking the arguments."""
    tgt, ref = _vec(sigma_tgt), _vec(sigma_ref)
    if tgt.shape != ref.shape:
        raise ValueError(f"{what}: sigma_tgt has {tgt.numel()} dims, sigma_ref {ref.numel()}")
    if not eps_rel >= 0:
        raise ValueError(f"{what}: eps_rel must be >= 0, got {eps_rel}")
    eps = ratio_eps(ref, eps_rel, tgt)
    return tgt + eps, ref + eps


def std_ratio(sigma_tgt: torch.Tensor, sigma_ref: torch.Tensor, eps_rel: float = Thresholds.eps_rel) -> torch.Tensor:
    """``(σ_tgt + eps) / (σ_ref + eps)`` per dim, float64, with ``eps = eps_rel × median(σ_ref ∪ σ_tgt)``."""
    tgt, ref = _shifted(sigma_tgt, sigma_ref, eps_rel, "std_ratio")
    return tgt / ref


def log_ratio(sigma_tgt: torch.Tensor, sigma_ref: torch.Tensor, eps_rel: float = Thresholds.eps_rel) -> torch.Tensor:
    """Natural log of :func:`std_ratio`, as ``log(σ_tgt + eps) - log(σ_ref + eps)``: swapping the models
    flips the sign bit for bit."""
    tgt, ref = _shifted(sigma_tgt, sigma_ref, eps_rel, "log_ratio")
    return torch.log(tgt) - torch.log(ref)


# ---------------------------------------------------------------------------- correlations
def pearson(a: Any, b: Any) -> float:
    """Centred Pearson correlation of two equal-length vectors (float64); NaN if either is constant."""
    x, y = _vec(a), _vec(b)
    if x.shape != y.shape:
        raise ValueError(f"pearson: lengths differ ({x.numel()} vs {y.numel()})")
    if x.numel() < 2 or not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    # normalise first so huge magnitudes (σ ≈ 2753 next to 0.01) cannot overflow or underflow
    nx, ny = torch.linalg.vector_norm(xc), torch.linalg.vector_norm(yc)
    if nx == 0 or ny == 0:
        return math.nan
    r = float(torch.dot(xc / nx, yc / ny))
    return max(-1.0, min(1.0, r))


def rankdata(a: Any) -> torch.Tensor:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata`` 'average'), float64."""
    x = _vec(a)
    n = x.numel()
    if n == 0:
        return x.clone()
    v, order = torch.sort(x, stable=True)
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = v[1:] != v[:-1]
    group = torch.cumsum(new_group.to(torch.int64), 0) - 1
    starts = torch.nonzero(new_group).reshape(-1)
    sizes = torch.diff(starts, append=torch.tensor([n]))
    avg = starts.to(_F64) + (sizes.to(_F64) + 1.0) / 2.0
    ranks = torch.empty(n, dtype=_F64)
    ranks[order] = avg[group]
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (Pearson of average ranks, ties handled); NaN for constant input."""
    x, y = _vec(a), _vec(b)
    if x.shape != y.shape:
        raise ValueError(f"spearman: lengths differ ({x.numel()} vs {y.numel()})")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0 or not (torch.isfinite(na) and torch.isfinite(nb)):
        return math.nan
    return float(torch.dot(a / na, b / nb))


# ---------------------------------------------------------------------------- per-token cosine
def _tokens(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"per_token_cosine: {name} must be a floating-point tensor [T, D]")
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"per_token_cosine: {name} must be [T, D] (or [1, T, D]), got {tuple(x.shape)}")
    return x


def per_token_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine of aligned tokens ``a[i]`` and ``b[i]`` for ``i < min(T, T2)`` (float64 compute, float32 out).

    ``mask`` (bool, length ≥ ``min(T, T2)``; extra entries ignored) keeps only the selected tokens,
    so the result has ``mask[:n].sum()`` entries. Zero-norm tokens give NaN.
    """
    a, b = _tokens(a, "a"), _tokens(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"per_token_cosine: hidden sizes differ ({a.shape[1]} vs {b.shape[1]})")
    n = min(a.shape[0], b.shape[0])
    x, y = a[:n].detach().to("cpu", _F64), b[:n].detach().to("cpu", _F64)
    if mask is not None:
        m = torch.as_tensor(mask).reshape(-1)
        if m.dtype != torch.bool or m.numel() < n:
            raise ValueError(f"per_token_cosine: mask must be a bool tensor with at least {n} entries")
        x, y = x[m[:n]], y[m[:n]]
    # scale each token by its max magnitude before the dot product (robust for 1e4-sized sinks)
    sx = x.abs().amax(-1, keepdim=True) if x.numel() else x.new_ones((x.shape[0], 1))
    sy = y.abs().amax(-1, keepdim=True) if y.numel() else y.new_ones((y.shape[0], 1))
    xs, ys = x / sx, y / sy
    cos = (xs * ys).sum(-1) / (torch.linalg.vector_norm(xs, dim=-1) * torch.linalg.vector_norm(ys, dim=-1))
    return cos.float()


def mean_token_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean of :func:`per_token_cosine` over its finite entries (NaN when there are none)."""
    cos = per_token_cosine(a, b, mask).to(_F64)
    cos = cos[torch.isfinite(cos)]
    return float(cos.mean()) if cos.numel() else math.nan


# ---------------------------------------------------------------------------- comparison
def _sigma(stats: DimStats, name: str) -> torch.Tensor:
    if not isinstance(stats, DimStats):
        raise TypeError(f"compare: {name} must be a DimStats, got {type(stats).__name__}")
    if stats.count < 2:
        raise ValueError(f"compare: {name} stats hold {stats.count} token(s); need at least 2 for a std")
    return stats.std(ddof=1)


def _dead(sigma: torch.Tensor, th: Thresholds) -> torch.Tensor:
    return (sigma < th.dead_abs) | (sigma < th.dead_rel * _median(sigma))


def _hyper(sigma: torch.Tensor, th: Thresholds) -> torch.Tensor:
    return sigma > th.hyper_mult * _median(sigma)


def _idx(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).reshape(-1).tolist()


@dataclass
class Comparison:
    """Result of :func:`compare`. Tensors are float32 ``[D]``; index sets sorted ``list[int]``."""

    ratio: torch.Tensor
    log_ratio: torch.Tensor
    sigma_ref: torch.Tensor
    sigma_tgt: torch.Tensor
    mean_ref: torch.Tensor
    mean_tgt: torch.Tensor
    outlier_high: list[int]
    outlier_low: list[int]
    dead_ref: list[int]
    dead_tgt: list[int]
    hyper_ref: list[int]
    hyper_tgt: list[int]
    dead_target_only: list[int]
    dead_reference_only: list[int]
    dead_shared: list[int]
    hyper_target_only: list[int]
    hyper_reference_only: list[int]
    hyper_shared: list[int]
    mean_pearson: float
    mean_spearman: float
    std_pearson: float
    std_spearman: float
    mean_cosine: float
    median_std_ref: float
    median_std_tgt: float
    count_ref: int
    count_tgt: int
    eps: float
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def outliers(self) -> list[int]:
        """Two-sided outlier dims (high ∪ low), sorted."""
        return sorted(set(self.outlier_high) | set(self.outlier_low))

    def top(self, n: int = 10, by: str = "log_ratio") -> list[dict[str, float | int]]:
        """The ``n`` most different dims as dicts ``{dim, ratio, sigma_ref, sigma_tgt, mean_ref, mean_tgt}``.

        ``by``: ``"log_ratio"`` (largest ``|ln r|`` first), ``"high"`` (largest ratio first) or
        ``"low"`` (smallest ratio first). Ties keep dim order.
        """
        lr = self.log_ratio.to(_F64)
        if by == "log_ratio":
            key = -lr.abs()
        elif by == "high":
            key = -lr
        elif by == "low":
            key = lr
        else:
            raise ValueError(f"Comparison.top: by must be 'log_ratio', 'high' or 'low', got {by!r}")
        order = torch.sort(key, stable=True).indices[: max(int(n), 0)].tolist()
        return [{"dim": d, "ratio": float(self.ratio[d]), "sigma_ref": float(self.sigma_ref[d]),
                 "sigma_tgt": float(self.sigma_tgt[d]), "mean_ref": float(self.mean_ref[d]),
                 "mean_tgt": float(self.mean_tgt[d])} for d in order]

    def to_dict(self, top_n: int = 10) -> dict[str, Any]:
        """JSON-serialisable summary (non-finite floats become ``None``)."""
        def f(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        r = self.ratio.to(_F64)
        return {
            "dims": int(self.ratio.numel()),
            "count_ref": self.count_ref, "count_tgt": self.count_tgt,
            "thresholds": {k: getattr(self.thresholds, k) for k in self.thresholds.__dataclass_fields__},
            "eps": f(self.eps),
            "std_ratio": {"median": f(_median(r)), "mean": f(float(r.mean())), "min": f(float(r.min())),
                          "max": f(float(r.max()))},
            "mean_pearson": f(self.mean_pearson), "mean_spearman": f(self.mean_spearman),
            "std_pearson": f(self.std_pearson), "std_spearman": f(self.std_spearman),
            "mean_cosine": f(self.mean_cosine),
            "median_std_ref": f(self.median_std_ref), "median_std_tgt": f(self.median_std_tgt),
            **{name: list(getattr(self, name)) for name in (
                "outlier_high", "outlier_low", "dead_ref", "dead_tgt", "hyper_ref", "hyper_tgt",
                "dead_target_only", "dead_reference_only", "dead_shared", "hyper_target_only",
                "hyper_reference_only", "hyper_shared")},
            "top": [{k: (v if isinstance(v, int) else f(v)) for k, v in row.items()} for row in self.top(top_n)],
        }


def compare(ref: DimStats, tgt: DimStats, thresholds: Thresholds = Thresholds()) -> Comparison:
    """Compare per-dim statistics of a target encoder against the reference (see module docs)."""
    s_ref, s_tgt = _sigma(ref, "ref"), _sigma(tgt, "tgt")
    if ref.dim != tgt.dim:
        raise ValueError(f"compare: ref has {ref.dim} dims, tgt {tgt.dim}")
    th = thresholds
    eps = ratio_eps(s_ref, th.eps_rel, s_tgt)
    r = (s_tgt + eps) / (s_ref + eps)
    lr = torch.log(s_tgt + eps) - torch.log(s_ref + eps)
    dead_r, dead_t = _dead(s_ref, th), _dead(s_tgt, th)
    hyp_r, hyp_t = _hyper(s_ref, th), _hyper(s_tgt, th)
    m_ref, m_tgt = ref.mean, tgt.mean
    return Comparison(
        ratio=r.float(), log_ratio=lr.float(), sigma_ref=s_ref.float(), sigma_tgt=s_tgt.float(),
        mean_ref=m_ref.float(), mean_tgt=m_tgt.float(),
        outlier_high=_idx(r > th.outlier_ratio), outlier_low=_idx(r < 1.0 / th.outlier_ratio),
        dead_ref=_idx(dead_r), dead_tgt=_idx(dead_t), hyper_ref=_idx(hyp_r), hyper_tgt=_idx(hyp_t),
        dead_target_only=_idx(dead_t & ~dead_r), dead_reference_only=_idx(dead_r & ~dead_t),
        dead_shared=_idx(dead_t & dead_r),
        hyper_target_only=_idx(hyp_t & ~hyp_r), hyper_reference_only=_idx(hyp_r & ~hyp_t),
        hyper_shared=_idx(hyp_t & hyp_r),
        mean_pearson=pearson(m_ref, m_tgt), mean_spearman=spearman(m_ref, m_tgt),
        std_pearson=pearson(s_ref, s_tgt), std_spearman=spearman(s_ref, s_tgt),
        mean_cosine=_cosine(m_ref, m_tgt),
        median_std_ref=_median(s_ref), median_std_tgt=_median(s_tgt),
        count_ref=ref.count, count_tgt=tgt.count, eps=eps, thresholds=th,
    )


# ---------------------------------------------------------------------------- consistency
def outlier_flags(ref: DimStats, tgt: DimStats, thresholds: Thresholds = Thresholds()) -> torch.Tensor:
    """Bool ``[D]``: two-sided outlier flags (``r > τ`` or ``r < 1/τ``) for one prompt's stats."""
    r = std_ratio(_sigma(tgt, "tgt"), _sigma(ref, "ref"), thresholds.eps_rel)
    return (r > thresholds.outlier_ratio) | (r < 1.0 / thresholds.outlier_ratio)


def consistency(flags: torch.Tensor, min_fraction: float = 0.5) -> tuple[list[int], list[int], torch.Tensor]:
    """Split per-prompt outlier flags ``[P, D]`` into consistent and prompt-specific dims.

    Returns ``(consistent, prompt_specific, frequency)``: ``consistent`` = dims flagged in at least
    ``min_fraction`` of the prompts, ``prompt_specific`` = flagged in ≥ 1 prompt but fewer,
    ``frequency`` = float32 ``[D]`` fraction of prompts flagging each dim.
    """
    f = torch.as_tensor(flags)
    if f.dim() != 2 or f.shape[0] < 1:
        raise ValueError(f"consistency: flags must be a [P, D] tensor with P >= 1, got shape {tuple(f.shape)}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"consistency: min_fraction must be in (0, 1], got {min_fraction}")
    hits = f.to(torch.bool).sum(0)
    p = f.shape[0]
    need = math.ceil(min_fraction * p - 1e-9)  # integer count: no float rounding at the boundary
    consistent = hits >= need
    return _idx(consistent), _idx((hits >= 1) & ~consistent), (hits.to(_F64) / p).float()


# ---------------------------------------------------------------------------- verdict
@dataclass(frozen=True)
class VerdictRow:
    name: str
    value: float
    threshold: float
    op: str  # ">" or "<"
    passed: bool


@dataclass(frozen=True)
class Verdict:
    """The research's quantitative verdict: every criterion must pass."""

    rows: tuple[VerdictRow, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_markdown(self) -> str:
        lines = ["| Criterion | Value | Required | Pass |", "|---|---|---|---|"]
        for r in self.rows:
            value = f"{int(r.value)}" if r.name == "outlier dims" and math.isfinite(r.value) else f"{r.value:.4f}"
            lines.append(f"| {r.name} | {value} | {r.op} {r.threshold:g} | {'yes' if r.passed else 'NO'} |")
        lines.append("")
        lines.append(f"**Verdict: {'PASS' if self.passed else 'FAIL'}**")
        return "\n".join(lines)


def verdict(cosine: float, std_correlation: float, mean_correlation: float,
            outlier_dims: int | Sequence[int], criteria: dict[str, float] = VERDICT_CRITERIA) -> Verdict:
    """Apply the criteria (cosine > 0.95, std corr. > 0.95, mean corr. > 0.9, outlier dims < 10).

    ``outlier_dims`` is a count or a collection of dims. Comparisons are strict; NaN never passes.
    """
    n_out = float(outlier_dims) if isinstance(outlier_dims, (int, float)) else float(len(outlier_dims))
    spec = [("cosine", float(cosine), float(criteria["cosine_min"]), ">"),
            ("std correlation", float(std_correlation), float(criteria["std_correlation_min"]), ">"),
            ("mean correlation", float(mean_correlation), float(criteria["mean_correlation_min"]), ">"),
            ("outlier dims", n_out, float(criteria["outlier_dims_max"]), "<")]
    rows = tuple(VerdictRow(name, v, t, op, bool(v > t) if op == ">" else bool(v < t)) for name, v, t, op in spec)
    return Verdict(rows)
