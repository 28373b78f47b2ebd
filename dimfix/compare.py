"""Reference-vs-target comparison of per-dimension statistics, classes and the verdict.

Conventions
    - σ is the ``ddof=1`` standard deviation of :class:`~dimfix.stats.DimStats`.
    - Ratios, medians and the dead / hyperactive / outlier classes are the rules of :mod:`dimfix.rules`
      (true median; relative epsilon of the pooled σ of both models).
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

from . import rules
from .config import VERDICT_CRITERIA, Thresholds
from .stats import DimStats

_F64 = torch.float64

__all__ = ["Comparison", "Verdict", "VerdictRow", "compare", "consistency", "pearson", "spearman", "verdict"]


def _vec(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=_F64).reshape(-1)
    return t


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


# ---------------------------------------------------------------------------- comparison
def _sigma(stats: DimStats, name: str) -> torch.Tensor:
    if not isinstance(stats, DimStats):
        raise TypeError(f"compare: {name} must be a DimStats, got {type(stats).__name__}")
    if stats.count < 2:
        raise ValueError(f"compare: {name} stats hold {stats.count} token(s); need at least 2 for a std")
    return stats.std(ddof=1)


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



def compare(ref: DimStats, tgt: DimStats, thresholds: Thresholds = Thresholds()) -> Comparison:
    """Compare per-dim statistics of a target encoder against the reference (see module docs)."""
    s_ref, s_tgt = _sigma(ref, "ref"), _sigma(tgt, "tgt")
    if ref.dim != tgt.dim:
        raise ValueError(f"compare: ref has {ref.dim} dims, tgt {tgt.dim}")
    th = thresholds
    eps = float(rules.ratio_eps(s_ref, s_tgt, th.eps_rel))
    r = rules.std_ratio(s_tgt, s_ref, th.eps_rel)
    lr = rules.log_ratio(s_tgt, s_ref, th.eps_rel)
    high, low = rules.outliers(r, th.outlier_ratio)
    dead_r, dead_t = rules.dead(s_ref, th), rules.dead(s_tgt, th)
    hyp_r, hyp_t = rules.hyper(s_ref, th), rules.hyper(s_tgt, th)
    m_ref, m_tgt = ref.mean, tgt.mean
    return Comparison(
        ratio=r.float(), log_ratio=lr.float(), sigma_ref=s_ref.float(), sigma_tgt=s_tgt.float(),
        mean_ref=m_ref.float(), mean_tgt=m_tgt.float(),
        outlier_high=_idx(high), outlier_low=_idx(low),
        dead_ref=_idx(dead_r), dead_tgt=_idx(dead_t), hyper_ref=_idx(hyp_r), hyper_tgt=_idx(hyp_t),
        dead_target_only=_idx(dead_t & ~dead_r), dead_reference_only=_idx(dead_r & ~dead_t),
        dead_shared=_idx(dead_t & dead_r),
        hyper_target_only=_idx(hyp_t & ~hyp_r), hyper_reference_only=_idx(hyp_r & ~hyp_t),
        hyper_shared=_idx(hyp_t & hyp_r),
        mean_pearson=pearson(m_ref, m_tgt), mean_spearman=spearman(m_ref, m_tgt),
        std_pearson=pearson(s_ref, s_tgt), std_spearman=spearman(s_ref, s_tgt),
        mean_cosine=_cosine(m_ref, m_tgt),
        median_std_ref=float(rules.median(s_ref)), median_std_tgt=float(rules.median(s_tgt)),
        count_ref=ref.count, count_tgt=tgt.count, eps=eps, thresholds=th,
    )


# ---------------------------------------------------------------------------- consistency
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
