"""Held-out evaluation of fix modes in the spaces the DiT looks at, and the recommended mode.

A *mode* is any callable ``mode(x, labels) -> x'`` on one prompt's aligned target tokens ``x``
``[T, D]`` (``labels``: TokenClass values ``[T]`` or None); :func:`perdim_mode`, :func:`adapter_mode`
and :func:`classwise_mode` wrap the per-dim scale/shift modes, fitted adapters and per-class
corrections. :class:`ModeEvaluator` streams held-out prompts (tokens aligned with the reference, see
:func:`dimfix.pairs.align_token_ids`), applies every mode and accumulates, per mode and in float64:

- the seeds' four numbers: mean per-token cosine, Pearson correlation of per-dim σ and of per-dim
  means against the held-out reference tokens, outlier dims (:func:`dimfix.compare.compare`), and
  their verdict (:func:`dimfix.compare.verdict`);
- the standardised cosine and error and the caption-space cosine and error
  (:class:`dimfix.diagnostics.TokenSimilarity`; caption space only with the caption embedder);
- the DiT-aware verdict (:func:`dimfix.diagnostics.dit_verdict`).

:meth:`ModeEvaluator.recommend` picks the passing mode with the smallest caption-space error (the
standardised error without the model); when no mode passes, the smallest error, marked as failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .adapter import AdapterFit
from .compare import Verdict, compare, verdict
from .config import Thresholds
from .diagnostics import DitVerdict, TokenSimilarity, dit_verdict
from .dit import CapEmbedder
from .perclass import ClassCorrection
from .stats import DimStats

Mode = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]

__all__ = ["Mode", "ModeResult", "ModeEvaluator", "perdim_mode", "adapter_mode", "classwise_mode",
           "results_markdown"]


def perdim_mode(scale: torch.Tensor, shift: torch.Tensor) -> Mode:
    """A per-dim mode ``x' = x·scale + shift`` (e.g. a :class:`dimfix.fixes.FixPlan`'s tensors)."""
    s, b = scale.float(), shift.float()
    return lambda x, labels=None: torch.addcmul(b, x.float(), s)


def adapter_mode(fit: AdapterFit) -> Mode:
    """The mode of a fitted adapter (any kind)."""
    return lambda x, labels=None: fit.apply(x.float())


def classwise_mode(corr: ClassCorrection) -> Mode:
    """The mode of a per-class correction (labels default to the Z-Image template positions)."""
    return lambda x, labels=None: corr.apply(x.float(), labels)


@dataclass(frozen=True)
class ModeResult:
    """One mode on the held-out prompts. ``caption_*`` are None without the caption embedder."""

    mode: str
    tokens: int
    cosine: float
    standardised_cosine: float
    caption_cosine: float | None
    std_correlation: float
    mean_correlation: float
    outlier_dims: int
    standardised_error: float
    caption_error: float | None
    seeds: Verdict
    verdict: DitVerdict

    @property
    def error(self) -> float:
        """The error the recommendation ranks by (caption space, else standardised)."""
        return self.caption_error if self.caption_error is not None else self.standardised_error


class ModeEvaluator:
    """Streaming held-out evaluation of ``modes`` (a name → :data:`Mode` mapping; see module docs).

    ``ref_mean``/``ref_std`` (``[D]``, e.g. the table's reference statistics) define the
    standardised space; ``cap`` the caption space.
    """

    def __init__(self, modes: dict[str, Mode], ref_mean: torch.Tensor, ref_std: torch.Tensor,
                 cap: CapEmbedder | None = None, thresholds: Thresholds = Thresholds()) -> None:
        if not modes:
            raise ValueError("ModeEvaluator: need at least one mode")
        self.modes = dict(modes)
        self.cap, self.thresholds = cap, thresholds
        dim = int(torch.as_tensor(ref_mean).numel())
        self.dim = dim
        self.sims = {m: TokenSimilarity(ref_mean, ref_std, cap) for m in self.modes}
        self.out_stats = {m: DimStats(dim, sample_rows=0) for m in self.modes}
        self.ref_stats = DimStats(dim, sample_rows=0)

    def update(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """One held-out prompt: aligned target ``x`` and reference ``y`` tokens (``[T, D]``)."""
        if x.shape != y.shape or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ModeEvaluator.update: x and y must both be [T, {self.dim}] aligned tokens, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        self.ref_stats.update(y)
        for name, mode in self.modes.items():
            out = mode(x, labels)
            if out.shape != x.shape or not bool(torch.isfinite(out).all()):
                raise ValueError(f"ModeEvaluator: mode {name!r} returned shape {tuple(out.shape)} or non-finite "
                                 f"values for input {tuple(x.shape)}")
            self.sims[name].update(out, y)
            self.out_stats[name].update(out)

    def results(self) -> list[ModeResult]:
        """One :class:`ModeResult` per mode, in the modes' order."""
        if self.ref_stats.count < 2:
            raise ValueError("ModeEvaluator.results: fewer than 2 held-out tokens were evaluated")
        out = []
        for name in self.modes:
            r = self.sims[name].result()
            comp = compare(self.ref_stats, self.out_stats[name], self.thresholds)
            seeds = verdict(r["cosine"], comp.std_pearson, comp.mean_pearson, len(comp.outliers))
            cap_cos = r["caption_cosine"] if self.cap is not None else None
            out.append(ModeResult(
                mode=name, tokens=self.ref_stats.count, cosine=r["cosine"],
                standardised_cosine=r["standardised_cosine"], caption_cosine=cap_cos,
                std_correlation=comp.std_pearson, mean_correlation=comp.mean_pearson,
                outlier_dims=len(comp.outliers), standardised_error=r["standardised_error"],
                caption_error=r["caption_error"] if self.cap is not None else None, seeds=seeds,
                verdict=dit_verdict(seeds, r["standardised_cosine"], cap_cos)))
        return out

    @staticmethod
    def recommend(results: list[ModeResult]) -> tuple[str, bool]:
        """``(mode, passed)``: the passing mode with the smallest error, else the smallest error overall."""
        if not results:
            raise ValueError("ModeEvaluator.recommend: no results")
        key = lambda r: r.error if math.isfinite(r.error) else math.inf  # noqa: E731
        passing = [r for r in results if r.verdict.passed]
        best = min(passing or results, key=key)
        return best.mode, bool(passing)


def results_markdown(results: list[ModeResult], recommended: str | None = None) -> str:
    """A markdown table of :meth:`ModeEvaluator.results` (one row per mode)."""
    def f(v: float | None) -> str:
        return "–" if v is None else (f"{v:.4f}" if math.isfinite(v) else "nan")

    lines = ["| mode | cosine | std. cosine | caption cosine | std corr | mean corr | outliers | std. error | "
             "caption error | seeds | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = f"**{r.mode}**" if r.mode == recommended else r.mode
        lines.append(f"| {name} | {f(r.cosine)} | {f(r.standardised_cosine)} | {f(r.caption_cosine)} | "
                     f"{f(r.std_correlation)} | {f(r.mean_correlation)} | {r.outlier_dims} | "
                     f"{f(r.standardised_error)} | {f(r.caption_error)} | "
                     f"{'PASS' if r.seeds.passed else 'FAIL'} | {'PASS' if r.verdict.passed else 'FAIL'} |")
    return "\n".join(lines)
