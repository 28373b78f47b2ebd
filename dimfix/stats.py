"""Streaming, mergeable per-dimension statistics of token matrices (float64).

:class:`DimStats` accumulates, for every one of ``D`` dimensions, the token count, the mean, the
central moment sums ``M2 = Σ(x-μ)²``, ``M3 = Σ(x-μ)³``, ``M4 = Σ(x-μ)⁴``, the minimum and maximum,
plus a bounded sample of rows for percentiles.

Numerics
    Inputs of any float dtype are upcast to float64 before any arithmetic (the input is never
    modified). Each batch is processed in chunks of :data:`CHUNK_ROWS` rows; a chunk's moments are
    computed about the chunk's own mean (centred, one vectorised pass) and combined with the running
    state by the exact pairwise formulas of Chan et al. / Terriberry / Pébay for the mean, M2, M3
    and M4. Centring keeps dims such as Qwen3's dim 4 (mean ≈ 925, σ ≈ 2753, sink values ≈ 1e4)
    and dims with σ ≈ 0.01 accurate in the same matrix. Non-finite inputs raise ``ValueError``.

Degenerate cases (derived values are float64 NaN, never an exception)
    - ``count == 0``: ``var``/``std``/``skewness``/``kurtosis``/``minimum``/``maximum``/
      ``percentiles`` and the ``float32()`` mean are NaN. (The raw fields are the accumulator's
      neutral state then: ``mean``/``m2``/``m3``/``m4`` zero, ``min`` +inf, ``max`` -inf.)
    - ``var``/``std``: NaN when ``count - ddof <= 0`` (so ``ddof=1`` needs 2 tokens).
    - ``skewness``/``kurtosis``: NaN for zero-variance dims (population variance
      ``<= (8·ε·|mean|)²`` with float64 ε, i.e. nothing float64 can resolve), like scipy
      (whose ``(ε·mean)²`` test can miss constant columns at large offsets and return garbage).
      With ``bias=False`` they are NaN when ``count < 3`` (skewness) / ``count < 4`` (kurtosis):
      the correction is undefined there (scipy silently returns the biased value instead).

Percentiles
    The first ``sample_rows`` rows (default :data:`DEFAULT_SAMPLE_ROWS`) are kept in float64, so
    while ``count <= sample_rows`` :meth:`DimStats.percentiles` equals ``numpy.percentile``
    (linear interpolation) exactly. Beyond that the kept rows are a uniform random sample without
    replacement of all rows seen (reservoir-style; merges draw the number of rows taken from each
    side from the hypergeometric distribution, so merged samples stay exactly uniform over the
    union). Memory is bounded by ``sample_rows × D × 8`` bytes. The estimate of the q-th
    percentile is then the sample's percentile: its rank error (as a fraction of all tokens) has a
    standard deviation of about ``sqrt(q(1-q)/sample_rows)`` (≈ 0.78 percentage points at the median,
    ≈ 0.05 points at q = 0.1 % with 4096 rows). ``q = 0`` and ``q = 100`` always return the exact
    min / max. Sampling is deterministic for a given ``seed`` and sequence of updates/merges.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

#: Rows kept for exact percentiles (and the reservoir size beyond): 4096 × 2560 × 8 B ≈ 84 MB.
DEFAULT_SAMPLE_ROWS = 4096
#: Rows upcast and reduced at once inside :meth:`DimStats.update` (bounds temporary memory).
CHUNK_ROWS = 4096
DEFAULT_PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
_ZERO_VAR_FACTOR = 8.0 * float(np.finfo(np.float64).eps)
_F64 = torch.float64

__all__ = ["DimStats", "DEFAULT_SAMPLE_ROWS", "DEFAULT_PERCENTILES"]


def _nan(dim: int) -> torch.Tensor:
    return torch.full((dim,), float("nan"), dtype=_F64)


class DimStats:
    """Per-dimension streaming moments, min/max and a percentile sample for ``[..., D]`` tokens.

    Fields: ``dim``, ``count`` (tokens accumulated), float64 ``[D]`` ``mean``, ``m2``, ``m3``, ``m4``
    (central moment sums), ``min``, ``max``; ``rows`` (the kept float64 rows).

    Args:
        dim: number of dimensions ``D`` (last axis of every update).
        sample_rows: rows kept for percentiles (exact up to this many tokens, uniform sample
            beyond); ``0`` disables percentiles.
        seed: seed of the deterministic row sampling.
    """

    def __init__(self, dim: int, sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0) -> None:
        if int(dim) < 1:
            raise ValueError(f"DimStats: dim must be >= 1, got {dim}")
        if int(seed) < 0:
            raise ValueError(f"DimStats: seed must be >= 0, got {seed}")
        if int(sample_rows) < 0:
            raise ValueError(f"DimStats: sample_rows must be >= 0, got {sample_rows}")
        self.dim = int(dim)
        self.sample_rows = int(sample_rows)
        self.seed = int(seed)
        self.count = 0
        self.mean = torch.zeros(self.dim, dtype=_F64)
        self.m2 = torch.zeros(self.dim, dtype=_F64)
        self.m3 = torch.zeros(self.dim, dtype=_F64)
        self.m4 = torch.zeros(self.dim, dtype=_F64)
        self.min = torch.full((self.dim,), math.inf, dtype=_F64)
        self.max = torch.full((self.dim,), -math.inf, dtype=_F64)
        self._rows = torch.empty((0, self.dim), dtype=_F64)  # buffer, may be over-allocated
        self._nrows = 0

    # ------------------------------------------------------------------ accumulation
    def _like(self) -> "DimStats":
        return DimStats(self.dim, self.sample_rows, self.seed)

    @property
    def rows(self) -> torch.Tensor:
        """The kept rows (float64 ``[min(count, sample_rows), D]``; a view, do not modify)."""
        return self._rows[: self._nrows]

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate the tokens of ``x`` (``[..., D]``, any float dtype; never modified).

        ``mask`` (bool, shape ``x.shape[:-1]``) selects the tokens to include. The update is atomic:
        on error (wrong shape/dtype, NaN/inf values) the state is unchanged.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DimStats.update: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"DimStats.update: x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"DimStats.update: x must have shape [..., {self.dim}], got {tuple(x.shape)}")
        flat = x.detach().reshape(-1, self.dim)
        keep = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("DimStats.update: mask must be a bool tensor")
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"DimStats.update: mask must have shape {tuple(x.shape[:-1])} (x.shape[:-1]), "
                    f"got {tuple(mask.shape)}")
            keep = mask.detach().reshape(-1).to(flat.device)
        batch = self._like()
        c_buf = d_buf = e_buf = None
        for start in range(0, flat.shape[0], CHUNK_ROWS):
            chunk = flat[start:start + CHUNK_ROWS]
            if keep is not None:
                chunk = chunk[keep[start:start + CHUNK_ROWS]]
            n = chunk.shape[0]
            if n == 0:
                continue
            if c_buf is None:  # reused float64 workspace: no per-chunk allocation
                rows = min(CHUNK_ROWS, flat.shape[0] if keep is None else int(keep.sum()))
                c_buf, d_buf, e_buf = (torch.empty((rows, self.dim), dtype=_F64) for _ in range(3))
            c = c_buf[:n]
            c.copy_(chunk)  # upcast (and device move) before any arithmetic; x is never written
            batch._combine(n, *_centred_moments(c, d_buf[:n], e_buf[:n]), rows=c, complete=True)
        if batch.count == 0:
            return
        if not (torch.isfinite(batch.mean).all() and torch.isfinite(batch.min).all()
                and torch.isfinite(batch.max).all() and torch.isfinite(batch.m4).all()):
            raise ValueError("DimStats.update: x contains NaN or infinite values "
                             "(fp16 overflow? encode in bf16/fp32)")
        self._absorb(batch)

    def _absorb(self, other: "DimStats") -> None:
        """Merge ``other`` into ``self`` in place (``other`` is not modified)."""
        if other.count:
            self._combine(other.count, other.mean, other.m2, other.m3, other.m4, other.min, other.max,
                          rows=other.rows, complete=other.exact_percentiles)

    def _combine(self, nb: int, mean_b: torch.Tensor, m2b: torch.Tensor, m3b: torch.Tensor,
                 m4b: torch.Tensor, min_b: torch.Tensor, max_b: torch.Tensor, *,
                 rows: torch.Tensor, complete: bool) -> None:
        """Pairwise (Chan / Terriberry / Pébay) merge of a part with ``nb`` tokens into ``self``."""
        self._merge_rows(rows, nb, complete)
        if self.count == 0:
            self.mean, self.m2, self.m3, self.m4 = mean_b.clone(), m2b.clone(), m3b.clone(), m4b.clone()
            self.min, self.max = min_b.clone(), max_b.clone()
            self.count = nb
            return
        na = float(self.count)
        n = na + nb
        delta = mean_b - self.mean
        d2 = delta * delta
        m2a, m3a = self.m2, self.m3
        self.m4 = (self.m4 + m4b + d2 * d2 * (na * nb * (na * na - na * nb + nb * nb) / (n ** 3))
                   + 6.0 * d2 * (na * na * m2b + nb * nb * m2a) / (n * n)
                   + 4.0 * delta * (na * m3b - nb * m3a) / n)
        self.m3 = (m3a + m3b + d2 * delta * (na * nb * (na - nb) / (n * n))
                   + 3.0 * delta * (na * m2b - nb * m2a) / n)
        self.m2 = m2a + m2b + d2 * (na * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.min = torch.minimum(self.min, min_b)
        self.max = torch.maximum(self.max, max_b)
        self.count += nb

    def _merge_rows(self, add: torch.Tensor, add_count: int, add_complete: bool) -> None:
        """Merge a row sample (``add``: all rows of a part with ``add_count`` tokens if
        ``add_complete``, else a uniform sample of them) into ``self``'s sample (before ``count`` moves)."""
        k = self.sample_rows
        if k == 0:
            return
        if self.exact_percentiles and add_complete and self._nrows + add.shape[0] <= k:
            self._append_rows(add)  # every row still kept: percentiles stay exact
            return
        rng = np.random.default_rng([self.seed, self.count, add_count, 0])
        # number of the k sampled rows that come from the new part: hypergeometric, so the merged
        # sample is a uniform k-subset of the union
        take_b = int(rng.hypergeometric(add_count, self.count, k)) if self.count else k
        src = torch.from_numpy(np.sort(rng.choice(add.shape[0], size=take_b, replace=False)))
        if self._nrows == k:  # full (owned) buffer: overwrite a uniform subset in place
            dst = torch.from_numpy(rng.choice(k, size=take_b, replace=False))
            self._rows[dst] = add.index_select(0, src)
            return
        keep_a = torch.from_numpy(np.sort(rng.choice(self._nrows, size=k - take_b, replace=False)))
        new = torch.empty((k, self.dim), dtype=_F64)
        torch.index_select(self._rows, 0, keep_a, out=new[: k - take_b])
        torch.index_select(add, 0, src, out=new[k - take_b:])
        self._rows, self._nrows = new, k

    def _append_rows(self, add: torch.Tensor) -> None:
        need = self._nrows + add.shape[0]
        if need > self._rows.shape[0]:
            cap = min(self.sample_rows, max(need, 2 * self._rows.shape[0], 16))
            grown = torch.empty((cap, self.dim), dtype=_F64)
            grown[: self._nrows] = self._rows[: self._nrows]
            self._rows = grown
        self._rows[self._nrows:need] = add
        self._nrows = need

    def merge(self, other: "DimStats") -> "DimStats":
        """A new :class:`DimStats` equal to accumulating both inputs (both stay unchanged).

        The result keeps ``min(self.sample_rows, other.sample_rows)`` rows and ``self.seed``.
        """
        if not isinstance(other, DimStats):
            raise TypeError(f"DimStats.merge: expected a DimStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"DimStats.merge: dims differ ({self.dim} vs {other.dim})")
        out = DimStats(self.dim, min(self.sample_rows, other.sample_rows), self.seed)
        out._absorb(self)
        out._absorb(other)
        return out

    # ------------------------------------------------------------------ derived
    def _mean_or_nan(self) -> torch.Tensor:
        return self.mean.clone() if self.count > 0 else _nan(self.dim)

    def var(self, ddof: int = 1) -> torch.Tensor:
        """Per-dim variance (float64 ``[D]``), NaN where ``count - ddof <= 0``."""
        if self.count - ddof <= 0:
            return _nan(self.dim)
        return self.m2 / float(self.count - ddof)

    def std(self, ddof: int = 1) -> torch.Tensor:
        """Per-dim standard deviation (float64 ``[D]``), NaN where ``count - ddof <= 0``."""
        return self.var(ddof).sqrt()

    def _zero_var(self) -> torch.Tensor:
        pop = self.m2 / float(self.count)
        return pop <= (_ZERO_VAR_FACTOR * self.mean.abs()) ** 2

    def skewness(self, bias: bool = True) -> torch.Tensor:
        """Per-dim skewness like ``scipy.stats.skew(x, bias=bias)`` (float64 ``[D]``)."""
        n = self.count
        if n == 0 or (not bias and n < 3):
            return _nan(self.dim)
        m2, m3 = self.m2 / n, self.m3 / n
        g1 = m3 / m2.pow(1.5)
        if not bias:
            g1 = g1 * (math.sqrt(n * (n - 1.0)) / (n - 2.0))
        return torch.where(self._zero_var(), torch.full_like(g1, math.nan), g1)

    def kurtosis(self, bias: bool = True, fisher: bool = True) -> torch.Tensor:
        """Per-dim kurtosis like ``scipy.stats.kurtosis(x, fisher=fisher, bias=bias)`` (float64 ``[D]``)."""
        n = self.count
        if n == 0 or (not bias and n < 4):
            return _nan(self.dim)
        m2, m4 = self.m2 / n, self.m4 / n
        b2 = m4 / (m2 * m2)  # Pearson kurtosis
        if not bias:
            b2 = 3.0 + (n - 1.0) / ((n - 2.0) * (n - 3.0)) * ((n + 1.0) * b2 - 3.0 * (n - 1.0))
        out = b2 - 3.0 if fisher else b2
        return torch.where(self._zero_var(), torch.full_like(out, math.nan), out)

    def minimum(self) -> torch.Tensor:
        """Per-dim minimum (float64 ``[D]``, NaN when empty)."""
        return self.min.clone() if self.count else _nan(self.dim)

    def maximum(self) -> torch.Tensor:
        """Per-dim maximum (float64 ``[D]``, NaN when empty)."""
        return self.max.clone() if self.count else _nan(self.dim)

    @property
    def exact_percentiles(self) -> bool:
        """True while every accumulated row is kept (percentiles equal ``numpy.percentile``)."""
        return self.count == self._nrows

    def percentiles(self, qs: Sequence[float] = DEFAULT_PERCENTILES) -> dict[float, torch.Tensor]:
        """Per-dim percentiles (``qs`` in percent, 0..100), linear interpolation, float64 ``[D]`` each.

        Exact while ``count <= sample_rows``; a uniform-sample estimate beyond (see module docs).
        """
        qs = [float(q) for q in qs]
        for q in qs:
            if not 0.0 <= q <= 100.0:
                raise ValueError(f"DimStats.percentiles: each q must be in [0, 100] (percent), got {q}")
        if self.count == 0:
            return {q: _nan(self.dim) for q in qs}
        if self.sample_rows == 0:
            raise ValueError("DimStats.percentiles: this DimStats was built with sample_rows=0 (no rows kept)")
        values = np.percentile(self.rows.numpy(), qs, axis=0) if qs else np.empty((0, self.dim))
        out = {}
        for i, q in enumerate(qs):
            if q == 0.0:
                out[q] = self.min.clone()
            elif q == 100.0:
                out[q] = self.max.clone()
            else:
                out[q] = torch.from_numpy(np.ascontiguousarray(values[i])).to(_F64)
        return out

    def float32(self, ddof: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 ``[D]`` tensors (the usual output precision)."""
        return self._mean_or_nan().float(), self.std(ddof).float()

    def __repr__(self) -> str:
        return f"DimStats(dim={self.dim}, count={self.count}, rows={self._nrows}/{self.sample_rows})"


def _centred_moments(c: torch.Tensor, d: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mean, M2, M3, M4, min, max) of one float64 chunk ``c`` ``[n, D]`` about its own mean.

    ``d`` and ``e`` are scratch buffers of the same shape (overwritten); ``c`` is only read.
    """
    n = c.shape[0]
    mean = c.sum(0) / n
    torch.sub(c, mean, out=d)
    if n > 1:  # compensation: makes Σd ≈ 0 to float64 rounding even when |mean| ≫ σ
        corr = d.sum(0) / n
        mean = mean + corr
        d.sub_(corr)
    torch.mul(d, d, out=e)  # e = d²
    m2 = e.sum(0)
    d.mul_(e)  # d = d³
    m3 = d.sum(0)
    e.mul_(e)  # e = d⁴
    m4 = e.sum(0)
    return mean, m2, m3, m4, c.amin(0), c.amax(0)
