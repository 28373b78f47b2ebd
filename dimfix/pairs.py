"""Token-aligned (target, reference) pairs: alignment, the prompt split and streaming pair sums.

A learned correction maps the *target* encoder's token ``x`` onto the *reference* token ``y`` of the
same prompt. Pairs only exist where both encoders saw the same token: :func:`align_token_ids` pairs
positions whose ids match (after dropping one appended ``<|endoftext|>``) and skips prompts that
were tokenised differently. :func:`is_heldout` splits prompts deterministically (hash of the text).

:class:`PairSums` accumulates, per prompt and in float64, the weight sum ``n``, the means of ``x``
and ``y``, the centred cross-moment matrices ``Cxx = Σ w (x-x̄)(x-x̄)ᵀ`` and ``Cxy = Σ w (x-x̄)(y-ȳ)ᵀ``
(``[D, D]``; omitted with ``full=False``), their diagonals and the diagonal of ``Cyy``, plus, when a
metric factor ``A`` (``[k, D]``) is given, ``qyy = Σ w |A (y-ȳ)|²``. Each update is centred about its
own mean and merged by the exact pairwise (Chan et al.) formulas (updates are copied into a float64
buffer of :data:`BUFFER_ROWS` rows, centred there in place and merged together: the sums do not depend
on how rows are grouped), so dims with mean ≈ 925 and σ ≈ 2750 next to σ ≈ 0.01 stay accurate. No
token matrix is kept: memory is ``2·D²·8`` bytes (52 MB each at D = 2560), plus the buffer (21 MB)
while rows are pending.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .tokens import ENDOFTEXT

_F64 = torch.float64
#: Rows buffered across updates before one merge (larger matrix products: ~1.5× faster at D = 2560).
BUFFER_ROWS = 512
_DIAG_ROWS = 64
#: Share of prompts held out to choose and judge the learned fixes.
HELDOUT_FRACTION = 0.2

__all__ = ["HELDOUT_FRACTION", "PairSums", "align_token_ids", "check_pairs", "is_heldout", "rmsnorm_weights"]


def align_token_ids(ids_tgt: Sequence[int], ids_ref: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Index pairs ``(i_tgt, i_ref)`` (int64) of the positions whose token ids match, or None.

    One trailing ``<|endoftext|>`` present on one side only is dropped first. Sequences of different
    lengths after that (another tokenizer or template) give None: the prompt is skipped. Positions
    whose ids differ are left out; a prompt with no matching position gives None.
    """
    a, b = [int(i) for i in ids_tgt], [int(i) for i in ids_ref]
    if len(a) == len(b) + 1 and a and a[-1] == ENDOFTEXT:
        a = a[:-1]
    elif len(b) == len(a) + 1 and b and b[-1] == ENDOFTEXT:
        b = b[:-1]
    if len(a) != len(b):
        return None
    idx = torch.tensor([i for i, (p, q) in enumerate(zip(a, b)) if p == q], dtype=torch.int64)
    return (idx, idx.clone()) if idx.numel() else None


def is_heldout(prompt: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Deterministic split: True for about ``fraction`` of prompts (SHA-256 of the UTF-8 text)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0 ** 64


def rmsnorm_weights(y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Token weights ``1 / (mean(y²) + eps)`` (float64 ``[...]``): with them, squared errors are in the
    units the DiT's per-token RMSNorm divides the reference token into."""
    y64 = y.detach().to(_F64)
    return 1.0 / ((y64 * y64).mean(-1) + float(eps))


def _tokens64(t: torch.Tensor, name: str, dim: int, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor [T, D]")
    if t.dim() < 1 or t.shape[-1] != dim:
        raise ValueError(f"{where}: {name} must have shape [..., {dim}], got {tuple(t.shape)}")
    return t.detach().reshape(-1, dim)


def check_pairs(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, dim: int,
                where: str = "PairSums.update") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated float64 CPU ``(x [T, D], y [T, D], weight [T])`` of aligned pairs (possibly views of the
    inputs; weight 1 when None). Wrong shapes, weights ≤ 0 and NaN/inf raise ``ValueError`` naming ``where``."""
    xs, ys = _tokens64(x, "x", dim, where), _tokens64(y, "y", dim, where)
    if xs.shape != ys.shape:
        raise ValueError(f"{where}: x and y must hold the same tokens, got {tuple(x.shape)} and {tuple(y.shape)}")
    if weight is None:
        w = torch.ones(xs.shape[0], dtype=_F64)
    else:
        w = torch.as_tensor(weight).detach().to("cpu", _F64).reshape(-1)
        if w.numel() != xs.shape[0] or not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"{where}: weight must hold {xs.shape[0]} finite values > 0")
    x64, y64 = xs.to("cpu", _F64), ys.to("cpu", _F64)
    if not (torch.isfinite(x64).all() and torch.isfinite(y64).all()):
        raise ValueError(f"{where}: x or y contains NaN or infinite values (fp16 overflow? encode in bf16/fp32)")
    return x64, y64, w


class PairSums:
    """Streaming, mergeable float64 sums of aligned token pairs (see the module docs).

    Args:
        dim: width ``D``.
        full: keep the ``[D, D]`` matrices ``cxx``/``cxy`` (needed to fit an adapter); with False
            only the per-dim diagonals (enough for per-dim correlations and per-dim fits).
        metric_factor: optional ``A`` ``[k, D]`` (e.g. the caption embedder ``W·diag(g)``): also
            accumulate ``qyy = Σ w |A (y-ȳ)|²`` for errors in the metric ``AᵀA``.
    """

    def __init__(self, dim: int, full: bool = True, metric_factor: torch.Tensor | None = None) -> None:
        if int(dim) < 1:
            raise ValueError(f"PairSums: dim must be >= 1, got {dim}")
        self.dim, self.full = int(dim), bool(full)
        self.count = 0
        self.n = 0.0
        self.mean_x = torch.zeros(self.dim, dtype=_F64)
        self.mean_y = torch.zeros(self.dim, dtype=_F64)
        self.cxx = torch.zeros((self.dim, self.dim), dtype=_F64) if self.full else None
        self.cxy = torch.zeros((self.dim, self.dim), dtype=_F64) if self.full else None
        self.dxx = torch.zeros(self.dim, dtype=_F64)
        self.dxy = torch.zeros(self.dim, dtype=_F64)
        self.dyy = torch.zeros(self.dim, dtype=_F64)
        self.metric_factor = None
        if metric_factor is not None:
            a = metric_factor.detach().to("cpu", _F64)
            if a.dim() != 2 or a.shape[1] != self.dim:
                raise ValueError(f"PairSums: metric_factor must be [k, {self.dim}], got {tuple(a.shape)}")
            self.metric_factor = a
        self.qyy = 0.0
        self._buf: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._buf_rows = 0

    def update(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add aligned pairs: target ``x`` and reference ``y`` (``[..., D]``, same shape; never modified).

        ``weight`` (``x.shape[:-1]``, > 0) weights each pair (default 1). NaN/inf raise ``ValueError``.
        """
        x64, y64, w = check_pairs(x, y, weight, self.dim)
        start, rows = 0, x64.shape[0]
        while start < rows:  # copied into the float64 buffer: never a view of the caller's tensor
            if self._buf is None:
                self._buf = tuple(torch.empty((BUFFER_ROWS, self.dim), dtype=_F64) for _ in range(2)) + (
                    torch.empty(BUFFER_ROWS, dtype=_F64),)
            k = min(rows - start, BUFFER_ROWS - self._buf_rows)
            for dst, src in zip(self._buf, (x64, y64, w)):
                dst[self._buf_rows:self._buf_rows + k] = src[start:start + k]
            self._buf_rows += k
            start += k
            if self._buf_rows == BUFFER_ROWS:
                self.flush()

    def flush(self) -> "PairSums":
        """Fold the buffered rows into the sums (every reader below calls it; call it before reading
        the fields directly). Returns ``self``."""
        if self._buf is not None and self._buf_rows:
            n = self._buf_rows
            self._add_chunk(*(b[:n] for b in self._buf))
        self._buf, self._buf_rows = None, 0  # the buffer is freed between fills (peak memory)
        return self

    def _add_chunk(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        """Merge rows of the private buffer (centred in place)."""
        nb = float(w.sum())
        mx, my = (w @ x) / nb, (w @ y) / nb
        x.sub_(mx)
        y.sub_(my)
        cx, cy = (w @ x) / nb, (w @ y) / nb  # compensation: makes Σ w·xc ≈ 0 to rounding
        mx, my = mx + cx, my + cy
        xc, yc = x.sub_(cx), y.sub_(cy)
        xw = xc if bool((w == 1).all()) else xc * w[:, None]
        na = self.n
        tot = na + nb
        f = na * nb / tot
        dx, dy = mx - self.mean_x, my - self.mean_y
        if self.full:
            self.cxx.addmm_(xc.T, xw).addr_(dx, dx, alpha=f)
            self.cxy.addmm_(xw.T, yc).addr_(dx, dy, alpha=f)
        for i in range(0, xc.shape[0], _DIAG_ROWS):  # per-dim sums without a [T, D] temporary
            sl = slice(i, i + _DIAG_ROWS)
            self.dxx += (xw[sl] * xc[sl]).sum(0)
            self.dxy += (xw[sl] * yc[sl]).sum(0)
            self.dyy += w[sl] @ yc[sl].square()
        self.dxx += f * dx * dx
        self.dxy += f * dx * dy
        self.dyy += f * dy * dy
        if self.metric_factor is not None:
            z = yc @ self.metric_factor.T
            self.qyy += float(((z * z).sum(1) * w).sum()) + f * float((self.metric_factor @ dy).square().sum())
        self.mean_x = self.mean_x + dx * (nb / tot)
        self.mean_y = self.mean_y + dy * (nb / tot)
        self.n = tot
        self.count += int(x.shape[0])

    def merge(self, other: "PairSums") -> "PairSums":
        """A new :class:`PairSums` equal to accumulating both (both stay unchanged; same dim/full/metric)."""
        if not isinstance(other, PairSums) or other.dim != self.dim or other.full != self.full:
            raise ValueError("PairSums.merge: need a PairSums with the same dim and full flag")
        if (self.metric_factor is None) != (other.metric_factor is None) or (
                self.metric_factor is not None and not torch.equal(self.metric_factor, other.metric_factor)):
            raise ValueError("PairSums.merge: both sums must use the same metric_factor")
        out = PairSums(self.dim, self.full, self.metric_factor)
        for part in (self.flush(), other.flush()):
            out._absorb(part)
        return out

    def _absorb(self, o: "PairSums") -> None:
        if o.n == 0:
            return
        na, nb = self.n, o.n
        tot = na + nb
        f = na * nb / tot
        dx, dy = o.mean_x - self.mean_x, o.mean_y - self.mean_y
        if self.full:
            self.cxx.add_(o.cxx).addr_(dx, dx, alpha=f)
            self.cxy.add_(o.cxy).addr_(dx, dy, alpha=f)
        self.dxx += o.dxx + f * dx * dx
        self.dxy += o.dxy + f * dx * dy
        self.dyy += o.dyy + f * dy * dy
        if self.metric_factor is not None:
            self.qyy += o.qyy + f * float((self.metric_factor @ dy).square().sum())
        self.mean_x = self.mean_x + dx * (nb / tot)
        self.mean_y = self.mean_y + dy * (nb / tot)
        self.n, self.count = tot, self.count + o.count

    def correlation(self) -> torch.Tensor:
        """Per-dim Pearson correlation of aligned ``x`` and ``y`` (float32 ``[D]``; NaN for constant dims)."""
        self.flush()
        den = (self.dxx * self.dyy).sqrt()
        r = torch.where(den > 0, self.dxy / den, torch.full_like(den, float("nan")))
        return r.clamp(-1.0, 1.0).float()

    def __repr__(self) -> str:
        return f"PairSums(dim={self.dim}, count={self.count + self._buf_rows}, full={self.full})"
