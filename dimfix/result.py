"""The result of a corpus analysis: per-layer comparisons, the verdict, the layer recommendation and
the fix table. Built by :meth:`dimfix.analysis.CorpusAnalysis.finish`; the report is
:mod:`dimfix.report`, the figures :func:`dimfix.plots.analysis_figures`.

Recommended layer (sweeps)
    The DiT only ever saw the reference at one layer (e.g. HF -2): the reference layer paired with the
    *report layer* (the first primary target layer). Every target layer is compared with the
    reference at that layer; the recommendation is the target layer with the fewest outlier dims,
    ties broken by the highest Pearson correlation of per-dim σ, then by the order of ``layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .compare import Comparison, Verdict, compare
from .config import Thresholds
from .fixtable import PERCENTILES, FixTable, FixTableMeta, percentile_name, utc_now_iso
from .stats import DimStats
from .tokens import ZIMAGE_TEMPLATE

__all__ = ["AnalysisResult", "LayerResult"]


@dataclass
class LayerResult:
    """Everything measured at one target layer (comparison on the analysis scope).

    ``layer``: the target's HF index; ``reference_layer``: the reference's HF index it is paired with.
    ``reference_classes`` / ``target_classes``: per token class name (``sink``, ``template``,
    ``content``, ``appended_eos``) the token count and the float64 per-dim mean (NaN when empty).
    """

    layer: int
    reference_layer: int
    comparison: Comparison
    reference: DimStats
    target: DimStats
    reference_classes: dict[str, tuple[int, torch.Tensor]]
    target_classes: dict[str, tuple[int, torch.Tensor]]
    consistent: list[int]
    prompt_specific: list[int]
    frequency: torch.Tensor
    flag_prompts: int
    cosine: float
    cosine_tokens: int
    verdict: Verdict
    caption_cosine: float | None = None
    sensitivity: torch.Tensor | None = None
    influence: torch.Tensor | None = None
    dit_ranking: list[dict[str, float | int]] | None = None


@dataclass
class AnalysisResult:
    """Output of :meth:`CorpusAnalysis.finish`; see the module docs for the definitions.

    - ``layers``: analysed target HF indices; ``results``: a :class:`LayerResult` per target layer;
      ``report_layer``: the first primary layer (default for :meth:`result`, :meth:`fix_table`, the
      report and plots); ``reference_layer``: the one reference layer every target layer is paired
      with, or None when layer ``k`` is paired with layer ``k``.
    - ``class_counts``: ``{"reference"|"target": {class name: token count}}`` over all prompts.
    - ``warnings``: too few tokens, prompts left out of the consistency split or the cosine, ...
    - ``prompt_cosines``: ``(index, prompt, mean aligned cosine at the report layer)`` per prompt.
    """

    layers: list[int]
    results: dict[int, LayerResult]
    report_layer: int
    token_scope: str
    thresholds: Thresholds
    prompt_count: int
    class_counts: dict[str, dict[str, int]]
    warnings: list[str]
    prompt_cosines: list[tuple[int, str, float]]
    reference_model: str = "reference"
    target_model: str = "target"
    dit_eps: float | None = None
    reference_layer: int | None = None
    created: str = field(default_factory=utc_now_iso)

    # ------------------------------------------------------------------ access
    @property
    def is_sweep(self) -> bool:
        return len(self.layers) > 1

    def result(self, layer: int | None = None) -> LayerResult:
        """The :class:`LayerResult` of ``layer`` (default: the report layer)."""
        key = self.report_layer if layer is None else int(layer)
        if key not in self.results:
            raise KeyError(f"layer {layer} was not analysed (analysed layers: {self.layers})")
        return self.results[key]

    def cross_layer(self, reference_layer: int | None = None) -> list[dict[str, Any]]:
        """Every target layer compared with the reference at ``reference_layer`` (an HF index the
        reference was measured at; default: the one paired with the report layer).

        Rows ``{layer, outliers, std_pearson, mean_pearson}`` in the order of :attr:`layers`. With a
        fixed reference layer these are the per-layer comparisons themselves.
        """
        if reference_layer is None:
            ref = self.result().reference
        else:
            found = [r.reference for r in self.results.values() if r.reference_layer == int(reference_layer)]
            if not found:
                measured = sorted({r.reference_layer for r in self.results.values()})
                raise KeyError(f"the reference was not measured at layer {reference_layer} (measured: {measured})")
            ref = found[0]
        rows = []
        for k in self.layers:
            c = compare(ref, self.results[k].target, self.thresholds)
            rows.append({"layer": k, "outliers": len(c.outliers), "std_pearson": c.std_pearson,
                         "mean_pearson": c.mean_pearson})
        return rows

    def recommended_layer(self) -> int:
        """Target layer closest to the reference at the report layer (rule in the module docs)."""
        rows = self.cross_layer()

        def key(i_row: tuple[int, dict[str, Any]]) -> tuple:
            i, row = i_row
            sp = row["std_pearson"]
            return (row["outliers"], -(sp if math.isfinite(sp) else -math.inf), i)

        return min(enumerate(rows), key=key)[1]["layer"]

    # ------------------------------------------------------------------ fix table
    def fix_table(self, layer: int | None = None, reference_model: str | None = None,
                  target_model: str | None = None, template: str = ZIMAGE_TEMPLATE) -> FixTable:
        """A :class:`~dimfix.fixtable.FixTable` of target ``layer`` (default: the report layer) and the
        reference layer paired with it.

        float32 means and σ (ddof=1) of the analysis scope for both models, the percentiles
        p0.1/p1/p50/p99/p99.9 when the layer kept samples (primary layers), and metadata (models,
        target and reference layers, template, scope, prompt count, reference-side token count,
        thresholds, creation time).
        """
        res = self.result(layer)
        ref_mean, ref_std = res.reference.float32()
        tgt_mean, tgt_std = res.target.float32()
        extras: dict[str, torch.Tensor] = {}
        qs = list(PERCENTILES)
        for side, stats in (("reference", res.reference), ("target", res.target)):
            if stats.sample_rows > 0:  # each side that kept samples (a fixed reference layer always does)
                for q, v in stats.percentiles(qs).items():
                    extras[percentile_name(side, q)] = v.float()
        meta = FixTableMeta(
            reference_model=self.reference_model if reference_model is None else str(reference_model),
            target_model=self.target_model if target_model is None else str(target_model),
            layer=int(res.layer), reference_layer=int(res.reference_layer), template=template,
            token_scope=self.token_scope, prompt_count=self.prompt_count, token_count=int(res.reference.count),
            created=self.created, thresholds=self.thresholds)
        return FixTable(ref_mean, ref_std, tgt_mean, tgt_std, extras=extras, meta=meta).validate()

    # ------------------------------------------------------------------ report and figures
    def report_markdown(self) -> str:
        """The markdown report (:func:`dimfix.report.report_markdown`)."""
        from .report import report_markdown

        return report_markdown(self)

    def plots(self) -> list[np.ndarray]:
        """RGB figures (uint8 ``[H, W, 3]``, :func:`dimfix.plots.analysis_figures`)."""
        from .plots import analysis_figures

        return analysis_figures(self)
