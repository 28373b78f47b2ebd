"""Corpus analysis: stream prompts' hidden states, compare two encoders, report, build a fix table.

:class:`CorpusAnalysis` receives, prompt by prompt, the hidden states of a *reference* encoder (what
the DiT was trained on) and of a *target* encoder (the substitute) for the same prompt, with their
token classes (``dimfix.tokens``). It keeps only running statistics — the hidden states are not
retained after :meth:`CorpusAnalysis.add_prompt` returns — and :meth:`CorpusAnalysis.finish`
turns them into an :class:`AnalysisResult` (comparisons, verdict, report, plots, fix table).

Per prompt
    - statistics of both models on the chosen token scope (:class:`~dimfix.stats.DimStats`, float64:
      moments, min/max, percentile sample) for every analysed layer, and per token class the count and
      the per-dim mean (for the class notes: e.g. the sink token's massive dims). Only the scope needs
      full statistics; one update per prompt and model keeps the per-prompt cost small;
    - per-prompt two-sided outlier flags on the chosen token scope (for the consistent vs
      prompt-specific split); a prompt with fewer than 2 scope tokens on either side gives no flags
      (noted in the warnings);
    - per-token cosine of *aligned* tokens: token ``i`` of the reference is compared with token ``i``
      of the target only when both are in scope and — if token ids are known for both — their ids
      are equal (an appended EOS or any shifted token is thereby left out). Without ids (e.g. a
      CONDITIONING from elsewhere) the two sequences must have the same length once an appended EOS
      is ignored, else the prompt gives no cosine (noted);
    - optional cosine in the DiT's caption-embedder space (:meth:`CorpusAnalysis.set_dit`).

Layers
    ``layers`` names the HF ``hidden_states`` indices stacked on axis 0 of the target's hidden tensor
    (``[L, T, D]``, all layers from one forward). By default the reference is stacked the same way and
    target layer ``k`` is paired with reference layer ``k``. With ``reference_layer`` the reference is
    measured at that one layer only (``[T, D]``) and *every* target layer is paired with it — e.g. a
    VL target at -6 against Qwen3-4B at -2. Every statistic of a pair equals the one of a
    single-layer analysis of that pair. The *primary* layers (default: all) keep percentile samples
    and get the caption-space cosine (the fixed reference layer always keeps samples); the other
    layers keep moments only, accumulated for all of them at once (fast sweeps, bounded memory).
    Moments are identical either way up to float64 rounding.

DiT-aware view (with :meth:`CorpusAnalysis.set_dit`, per layer)
    ``sensitivity`` s_d = |g_d|·‖W[:, d]‖₂ of the caption embedder (RMSNorm gain g, Linear weight W);
    ``influence`` = s_d·σ_ref,d; ``dit_ranking`` = the dims by ``influence × |ln ratio|`` (a σ mismatch is
    relative, so what reaches the caption features is about s_d·σ_ref,d·|ln ratio|); ``caption_cosine``
    (primary layers) = mean per-token cosine of reference and target after RMSNorm + Linear.

Verdict numbers (per layer, on the chosen scope)
    cosine = mean per-token cosine of the aligned scope tokens over all prompts; std correlation =
    Pearson of per-dim σ; mean correlation = Pearson of per-dim means; outlier dims = two-sided
    ``σ_tgt/σ_ref > τ or < 1/τ`` count (``dimfix.compare``).

Recommended layer (sweeps)
    The DiT only ever saw the reference at one layer (e.g. HF -2): the reference layer paired with the
    *report layer* (the first primary target layer). Every target layer is compared with the
    reference at that layer; the recommendation is the target layer with the fewest outlier dims,
    ties broken by the highest Pearson correlation of per-dim σ, then by the order of ``layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from . import dit as dit_mod
from . import rules
from .compare import Comparison, Verdict, compare, consistency, verdict
from .config import Thresholds
from .fixtable import PERCENTILES, FixTable, FixTableMeta, percentile_name, utc_now_iso
from .stats import DEFAULT_SAMPLE_ROWS, DimStats
from .tokens import SCOPES, ZIMAGE_TEMPLATE, TokenClass, scope_mask

__all__ = ["CorpusAnalysis", "AnalysisResult", "LayerResult", "DEFAULT_LAYER"]

#: The Z-Image default: HF ``hidden_states[-2]`` of Qwen3-4B.
DEFAULT_LAYER = -2
_F64 = torch.float64
_TOP_ROWS = 20
_MAX_LISTED = 60


def _short(text: str | None, n: int = 48) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _fmt(v: float, digits: int = 4) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}"


def _listing(dims: Sequence[int]) -> str:
    dims = list(dims)
    if not dims:
        return "none"
    shown = ", ".join(str(d) for d in dims[:_MAX_LISTED])
    return shown + (f", … ({len(dims) - _MAX_LISTED} more)" if len(dims) > _MAX_LISTED else "")


def _pair_label(layer: int, reference_layer: int) -> str:
    """``layer k`` for a same-layer pair, else ``target layer k vs reference layer r``."""
    if layer == reference_layer:
        return f"layer {layer}"
    return f"target layer {layer} vs reference layer {reference_layer}"


def _slice_stats(big: DimStats, j: int, dim: int) -> DimStats:
    """Layer ``j`` of moments-only stats over ``L × dim`` columns, as a ``dim``-wide :class:`DimStats`."""
    out = DimStats(dim, sample_rows=0, seed=big.seed)
    if big.count == 0:
        return out
    sl = slice(j * dim, (j + 1) * dim)
    out.count = big.count
    out.mean, out.m2, out.m3, out.m4 = (t[sl].clone() for t in (big.mean, big.m2, big.m3, big.m4))
    out.min, out.max = big.min[sl].clone(), big.max[sl].clone()
    return out


def _std_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per-layer, per-dim std (ddof=1) of ``x`` ``[L, n, D]`` (any float dtype) over its tokens, float64."""
    x64 = x.to(_F64)
    d = x64 - x64.mean(1, keepdim=True)
    return (d.mul_(d).sum(1) / (x64.shape[1] - 1)).sqrt_()


def _ratio_flags(s_ref: torch.Tensor, s_tgt: torch.Tensor, th: Thresholds) -> torch.Tensor:
    """Two-sided outlier flags ``[L, D]`` from per-layer σ ``[L, D]`` (``s_ref`` may be ``[1, D]``)."""
    high, low = rules.outliers(rules.std_ratio(s_tgt, s_ref, th.eps_rel), th.outlier_ratio)
    return high | low


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

    @property
    def has_percentiles(self) -> bool:
        return self.reference.sample_rows > 0 and self.target.sample_rows > 0


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
    scope: str
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
            token_scope=self.scope, prompt_count=self.prompt_count, token_count=int(res.reference.count),
            created=self.created, thresholds=self.thresholds)
        return FixTable(ref_mean, ref_std, tgt_mean, tgt_std, extras=extras, meta=meta).validate()

    # ------------------------------------------------------------------ report
    def _class_notes(self, res: LayerResult) -> list[str]:
        lines = []
        content_sigma = res.comparison.median_std_ref
        for cls in (TokenClass.SINK, TokenClass.TEMPLATE, TokenClass.APPENDED_EOS):
            parts = []
            for name, classes in ((self.reference_model, res.reference_classes),
                                  (self.target_model, res.target_classes)):
                count, mean = classes[cls.name.lower()]
                if count == 0:
                    continue
                top = torch.sort(-mean.abs(), stable=True).indices[:5].tolist()
                cells = ", ".join(f"{d} ({float(mean[d]):+.4g})" for d in top)
                parts.append(f"{name}: {count} tokens; largest |mean| dims {cells}")
            if parts:
                lines.append(f"- **{cls.name.lower()}**: " + "; ".join(parts))
        if lines:
            lines.insert(0, f"Scale for comparison: median per-dim σ of the reference on the {self.scope!r} scope "
                            f"= {_fmt(content_sigma)}. Position 0 (sink) is where Qwen3 writes its massive "
                            "activations; these tokens are excluded from the 'content' scope.")
            lines.insert(1, "")
        return lines

    def report_markdown(self) -> str:
        """A markdown report: summary, verdict, top dims, consistency, classes, DiT view, sweep, usage."""
        res = self.result()
        c = res.comparison
        L, R = res.layer, res.reference_layer
        layers = (f"- Layer: HF `hidden_states[{L}]`" if R == L else
                  f"- Layers: reference HF `hidden_states[{R}]`, target HF `hidden_states[{L}]`")
        out: list[str] = [f"# Dimension analysis: {self.target_model} vs {self.reference_model}", ""]
        out += [f"- Reference: **{self.reference_model}**; target: **{self.target_model}**",
                layers + (f" (layer sweep over {len(self.layers)} target layers)" if self.is_sweep else ""),
                f"- Token scope: `{self.scope}`; prompts: {self.prompt_count}; tokens in scope: "
                f"{c.count_ref} (reference), {c.count_tgt} (target)",
                f"- Thresholds: τ = {self.thresholds.outlier_ratio:g}, dead σ < {self.thresholds.dead_abs:g}, "
                f"hyperactive σ > {self.thresholds.hyper_mult:g} × median σ", ""]
        out += ["| Token class | Reference tokens | Target tokens |", "|---|---|---|"]
        for name in self.class_counts["reference"]:
            out.append(f"| {name} | {self.class_counts['reference'][name]} | {self.class_counts['target'][name]} |")
        out.append("")
        if self.warnings:
            out += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]

        out += [f"## Verdict ({_pair_label(L, R)})", "", res.verdict.to_markdown(), "",
                f"Cosine = mean per-token cosine of {res.cosine_tokens} aligned tokens in scope; std / mean "
                "correlation = Pearson correlation of the per-dim σ / means; outlier dims = dims with "
                f"σ_tgt/σ_ref > {self.thresholds.outlier_ratio:g} or < 1/{self.thresholds.outlier_ratio:g}.", ""]
        r = c.ratio.double()
        out += [f"Std ratio σ_tgt/σ_ref: median {_fmt(float(torch.quantile(r, 0.5)))}, min {_fmt(float(r.min()))}, "
                f"max {_fmt(float(r.max()))}; outliers high {len(c.outlier_high)}, low {len(c.outlier_low)}; "
                f"Spearman of σ {_fmt(c.std_spearman)}, of means {_fmt(c.mean_spearman)}.", "",
                f"Dead dims: target-only {_listing(c.dead_target_only)}; reference-only "
                f"{_listing(c.dead_reference_only)}. Hyperactive dims: target-only {_listing(c.hyper_target_only)}; "
                f"reference-only {_listing(c.hyper_reference_only)}; shared {_listing(c.hyper_shared)}.", ""]

        out += ["## Most different dimensions", "",
                "| Dim | σ_ref | σ_tgt | Ratio | μ_ref | μ_tgt | Flagged in prompts |",
                "|---|---|---|---|---|---|---|"]
        for row in c.top(_TOP_ROWS):
            d = row["dim"]
            freq = f"{100 * float(res.frequency[d]):.0f}%" if res.flag_prompts else "n/a"
            out.append(f"| {d} | {_fmt(row['sigma_ref'])} | {_fmt(row['sigma_tgt'])} | {_fmt(row['ratio'])} | "
                       f"{_fmt(row['mean_ref'])} | {_fmt(row['mean_tgt'])} | {freq} |")
        out.append("")

        out += ["## Consistent vs prompt-specific outlier dims", "",
                f"Per-prompt flags from {res.flag_prompts} prompt(s) with ≥ 2 scope tokens on both sides. "
                "Consistent = flagged in ≥ 50% of them (a property of the encoder: a fix table helps); "
                "prompt-specific = flagged in at least one but fewer (content-dependent: a fix may hurt).", "",
                f"- Consistent ({len(res.consistent)}): {_listing(res.consistent)}",
                f"- Prompt-specific ({len(res.prompt_specific)}): {_listing(res.prompt_specific)}", ""]
        if self.prompt_cosines:
            worst = sorted(self.prompt_cosines, key=lambda t: (t[2] if math.isfinite(t[2]) else -math.inf))[:5]
            out += ["Lowest per-prompt cosines: " + "; ".join(f"#{i} {_short(p, 40)!r} {_fmt(v)}" for i, p, v in worst),
                    ""]

        notes = self._class_notes(res)
        if notes:
            out += ["## Token classes", ""] + notes + [""]

        if res.dit_ranking is not None:
            out += ["## DiT-aware view (caption embedder)", "",
                    "The DiT's first op is `Linear(RMSNorm(x))`: a per-token scale is invisible to it, per-dim "
                    "changes are not. Sensitivity s_d = |g_d|·‖W[:, d]‖₂ (RMSNorm gain g, Linear weight W) is "
                    "what a unit of dim d moves the caption features; dims are ranked by score = s_d · σ_ref,d · "
                    "|ln ratio|, the sensitivity weighted by how much of dim d the reference actually carries "
                    "(a σ mismatch is relative: it moves the features by about s_d·σ_ref,d·|ln ratio|).", ""]
            if res.caption_cosine is not None:
                out += [f"Mean per-token cosine in caption-embedder space (aligned scope tokens): "
                        f"{_fmt(res.caption_cosine)} (raw hidden-state cosine {_fmt(res.cosine)}).", ""]
            out += ["| Dim | Score | s_d | σ_ref | Ratio |", "|---|---|---|---|---|"]
            for row in res.dit_ranking:
                out.append(f"| {row['dim']} | {_fmt(row['score'])} | {_fmt(row['sensitivity'])} | "
                           f"{_fmt(row['sigma_ref'])} | {_fmt(row['ratio'])} |")
            out.append("")

        if self.is_sweep:
            rec = self.recommended_layer()
            cross = self.cross_layer()
            if self.reference_layer is None:
                out += ["## Layer sweep", "",
                        f"Same layer = reference layer k vs target layer k. vs ref {R} = target layer k vs the "
                        f"reference at layer {R} (what the DiT was trained on).", "",
                        "| Layer | Outliers (same layer) | Std corr (same layer) | Consistent | "
                        f"Outliers (vs ref {R}) | Std corr (vs ref {R}) |", "|---|---|---|---|---|---|"]
                for row in cross:
                    lr_ = self.results[row["layer"]]
                    out.append(f"| {row['layer']} | {len(lr_.comparison.outliers)} | "
                               f"{_fmt(lr_.comparison.std_pearson)} | {len(lr_.consistent)} | {row['outliers']} | "
                               f"{_fmt(row['std_pearson'])} |")
            else:
                out += ["## Layer sweep", "",
                        f"Every target layer k vs the reference at layer {R} (what the DiT was trained on).", "",
                        "| Target layer | Outlier dims | Std corr | Mean corr | Consistent | Cosine |",
                        "|---|---|---|---|---|---|"]
                for row in cross:
                    lr_ = self.results[row["layer"]]
                    out.append(f"| {row['layer']} | {row['outliers']} | {_fmt(row['std_pearson'])} | "
                               f"{_fmt(row['mean_pearson'])} | {len(lr_.consistent)} | {_fmt(lr_.cosine)} |")
            pairs = (f"the same layer ({L}) of both encoders" if R == L else
                     f"reference layer {R} with target layer {L}")
            out += ["", f"**Recommended target layer: {rec}** — fewest outlier dims against the reference at layer "
                        f"{R}, ties broken by the highest std correlation. The fix table of this run pairs {pairs}."
                    + ("" if rec == L else
                       f" For a table of layer {rec}, re-run with target layer {rec} (reference layer {R}) and "
                       f"select layer {rec} on the target's conditioning (Hidden Layer Select)."), ""]

        out += ["## How to use this table", "",
                "- Connect the FIX_TABLE output (or a saved table from `models/fix_tables`) to **Embedding "
                f"Dimension Fix** on the target encoder's conditioning taken at layer {L}, with the same token "
                "scope.",
                "- Few consistent outliers and a passing verdict: the target is usable as is or with the "
                "default affine fix. Many prompt-specific outliers: prefer a lower fix strength.",
                "- Re-run with more prompts when a warning says there are too few tokens.", ""]
        return "\n".join(out)

    # ------------------------------------------------------------------ plots
    def plots(self) -> list[np.ndarray]:
        """RGB figures (uint8 ``[H, W, 3]``): ratio histogram, σ scatter, top outliers, dimension and
        token classes, and for sweeps a layer × dim heatmap of the target's σ."""
        from . import plots

        res = self.result()
        c = res.comparison
        tau = self.thresholds.outlier_ratio
        where = _pair_label(res.layer, res.reference_layer)
        images = [
            plots.ratio_histogram(torch.log10(c.ratio.double()), tau=tau,
                                  title=f"log10(σ_target / σ_reference), {where}, {self.scope} tokens"),
            plots.sigma_scatter(c.sigma_ref, c.sigma_tgt, tau=tau,
                                title=f"Per-dimension σ: {_short(self.target_model, 30)} vs "
                                      f"{_short(self.reference_model, 30)} ({where})"),
            plots.top_outlier_bars(c.ratio, n=10, tau=tau),
            plots.class_counts({"dead": [len(c.dead_ref), len(c.dead_tgt)],
                                "hyperactive": [len(c.hyper_ref), len(c.hyper_tgt)]},
                               labels=(_short(self.reference_model, 30), _short(self.target_model, 30)),
                               title="Dimension classes"),
            plots.class_counts({k: [self.class_counts["reference"][k], self.class_counts["target"][k]]
                                for k in self.class_counts["reference"]},
                               labels=(_short(self.reference_model, 30), _short(self.target_model, 30)),
                               title="Tokens per class", ylabel="tokens"),
        ]
        if self.is_sweep:
            std = torch.stack([self.results[k].comparison.sigma_tgt for k in self.layers])
            images.append(plots.layer_heatmap(std, [str(k) for k in self.layers],
                                              title=f"Target per-dimension σ by layer (log10(σ + 1)), "
                                                    f"{self.scope} tokens"))
        return images


class CorpusAnalysis:
    """Streaming analysis of a prompt corpus encoded by a reference and a target encoder.

    Args:
        dim: hidden size ``D`` (both encoders).
        layers: HF ``hidden_states`` indices stacked on axis 0 of the target's hidden tensor
            (``[L, T, D]``) — and of the reference's unless ``reference_layer`` is given; ``None`` = one
            layer, HF -2, given as ``[T, D]``.
        thresholds: classification thresholds (τ etc.).
        scope: token scope of the comparison: ``"content"`` (default), ``"no_sink"`` or ``"all"``.
        primary_layers: target layers that keep percentile samples and get the caption-space cosine
            (default: all). The first one is the report layer.
        sample_rows, seed: passed to the statistics (percentile sample size, sampling seed).
        reference_layer: HF index of the reference's hidden states when the reference is measured at
            this one layer (``ref_hidden`` ``[T, D]`` or ``[1, T, D]``) and every target layer is paired
            with it; ``None`` (default) = the reference is stacked like the target and layer ``k`` is
            paired with layer ``k``.
    """

    def __init__(self, dim: int, layers: Sequence[int] | None = None, thresholds: Thresholds = Thresholds(),
                 scope: str = "content", primary_layers: Sequence[int] | None = None,
                 sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0,
                 reference_layer: int | None = None) -> None:
        if int(dim) < 1:
            raise ValueError(f"CorpusAnalysis: dim must be >= 1, got {dim}")
        if scope not in SCOPES:
            raise ValueError(f"CorpusAnalysis: token scope must be one of {list(SCOPES)}, got {scope!r}")
        if not isinstance(thresholds, Thresholds):
            raise TypeError("CorpusAnalysis: thresholds must be a dimfix.config.Thresholds")
        self.dim = int(dim)
        self.stacked = layers is not None
        self.layers = [DEFAULT_LAYER] if layers is None else [int(k) for k in layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"CorpusAnalysis: layers must be a non-empty list of distinct ints, got {layers}")
        primary = list(self.layers) if primary_layers is None else [int(k) for k in primary_layers]
        unknown = [k for k in primary if k not in self.layers]
        if not primary or unknown:
            raise ValueError(f"CorpusAnalysis: primary_layers must be a non-empty subset of layers {self.layers}, "
                             f"got {primary_layers}")
        self.primary = list(dict.fromkeys(primary))
        if reference_layer is not None and (isinstance(reference_layer, bool)
                                            or not isinstance(reference_layer, (int, np.integer))):
            raise TypeError(f"CorpusAnalysis: reference_layer must be an int HF index or None, got {reference_layer!r}")
        self.reference_layer = None if reference_layer is None else int(reference_layer)
        self.thresholds = thresholds
        self.scope = scope
        self.sample_rows = int(sample_rows)
        self.seed = int(seed)
        # per side: stacked layers, primary layers, their positions and the secondary layers' positions
        fixed = self.reference_layer is not None
        self._layers = {"ref": [self.reference_layer] if fixed else list(self.layers), "tgt": list(self.layers)}
        self._primary = {"ref": [self.reference_layer] if fixed else list(self.primary), "tgt": list(self.primary)}
        self._pidx = {side: [self._layers[side].index(k) for k in self._primary[side]] for side in ("ref", "tgt")}
        self._sidx = {side: [j for j, k in enumerate(self._layers[side]) if k not in self._primary[side]]
                      for side in ("ref", "tgt")}
        # scope stats: full (with percentile sample) per primary layer; moments only, all secondary
        # layers at once as one [L' x D]-wide DimStats
        self._full = {side: [DimStats(self.dim, self.sample_rows, self.seed) for _ in self._pidx[side]]
                      for side in ("ref", "tgt")}
        self._bulk = {side: DimStats(self.dim * len(self._sidx[side]), 0, self.seed) if self._sidx[side] else None
                      for side in ("ref", "tgt")}
        n_cls = len(TokenClass)
        self._csum = {side: torch.zeros(n_cls, len(self._layers[side]), self.dim, dtype=_F64)
                      for side in ("ref", "tgt")}
        self._ccount = {side: torch.zeros(n_cls, dtype=torch.int64) for side in ("ref", "tgt")}
        self._flags: list[torch.Tensor] = []  # bool [L, D] per prompt with flags
        self._cos_sum = torch.zeros(len(self.layers), dtype=_F64)
        self._cos_n = torch.zeros(len(self.layers), dtype=torch.int64)
        self._cap_sum = torch.zeros(len(self.primary), dtype=_F64)
        self._cap_n = torch.zeros(len(self.primary), dtype=torch.int64)
        self._prompt_cos: list[tuple[int, str, float]] = []
        self._notes: list[str] = []
        self._prompts = 0
        self._dit: dit_mod.CapEmbedder | None = None

    # ------------------------------------------------------------------ setup
    def set_dit(self, gain: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                eps: float | None = 1e-5) -> None:
        """Enable the DiT-aware view with Z-Image's caption embedder (RMSNorm gain, Linear weight/bias, eps).

        Must be called before the first prompt when the caption-space cosine is wanted.
        """
        cap = dit_mod.CapEmbedder.from_weights(gain, weight, bias, eps)
        if cap.in_dim != self.dim:
            raise ValueError(f"set_dit: the caption embedder takes {cap.in_dim}-dim input but the encoders have "
                             f"{self.dim} dims (is this the Z-Image model for this text encoder?)")
        if self._prompts:
            self._notes.append("DiT weights were set after the first prompt: the caption-space cosine covers "
                               "only later prompts")
        self._dit = cap

    @property
    def prompt_count(self) -> int:
        return self._prompts

    # ------------------------------------------------------------------ per prompt
    def _check(self, hidden: torch.Tensor, labels: torch.Tensor, ids: Sequence[int] | None, name: str) -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError(f"add_prompt: {name}_hidden must be a floating-point tensor, got "
                            f"{type(hidden).__name__ if not isinstance(hidden, torch.Tensor) else hidden.dtype}")
        layers = self._layers[name]
        n_layers = len(layers)
        if hidden.dim() == 2 and n_layers == 1:
            hidden = hidden.unsqueeze(0)
        if hidden.dim() != 3 or hidden.shape[0] != n_layers or hidden.shape[-1] != self.dim:
            if n_layers == 1 and (not self.stacked or name == "ref"):
                want = f"[T, {self.dim}] (layer {layers[0]})"
            else:
                want = f"[{n_layers}, T, {self.dim}] (layers {layers})"
            raise ValueError(f"add_prompt: {name}_hidden must have shape {want}, got {tuple(hidden.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != hidden.shape[1]:
            raise ValueError(f"add_prompt: {name}_labels must be an int64 tensor [T] with T = {hidden.shape[1]} "
                             f"(dimfix.tokens.classify_ids / classify_positions)")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"add_prompt: {name}_labels must be an int64 tensor of TokenClass values, "
                            f"got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(TokenClass)):
            valid = {int(c) for c in TokenClass}
            unknown = sorted(set(torch.unique(labels).tolist()) - valid)
            raise ValueError(f"add_prompt: {name}_labels has unknown token classes {unknown} (valid {sorted(valid)})")
        if ids is not None and len(ids) != hidden.shape[1]:
            raise ValueError(f"add_prompt: {name}_ids has {len(ids)} entries for {hidden.shape[1]} tokens")
        bad = int((~torch.isfinite(hidden)).sum())
        if bad:
            raise ValueError(f"add_prompt: {name}_hidden of prompt #{self._prompts} contains {bad} NaN/Inf value(s) "
                             "(fp16 overflow? encode in bf16 or fp32); nothing from this prompt was recorded")
        return hidden.detach().cpu()  # a no-op for CPU tensors; all statistics live on the CPU

    def _update(self, side: str, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        if bool(mask.any()):
            for i, j in enumerate(self._pidx[side]):
                self._full[side][i].update(hidden[j], mask)
            if self._sidx[side]:  # all secondary layers as one [T, L'·D] matrix: one vectorised update
                x = hidden[self._sidx[side]].permute(1, 0, 2).reshape(hidden.shape[1], -1)
                self._bulk[side].update(x, mask)
        onehot = torch.nn.functional.one_hot(labels.to(torch.int64), len(TokenClass)).to(_F64)  # [T, C]
        self._csum[side] += torch.einsum("tc,ltd->cld", onehot, hidden.to(_F64))
        self._ccount[side] += onehot.sum(0).to(torch.int64)

    def _aligned(self, ref_labels: torch.Tensor, tgt_labels: torch.Tensor, ref_ids: Sequence[int] | None,
                 tgt_ids: Sequence[int] | None) -> torch.Tensor | None:
        """Bool mask over the first ``min(T, T2)`` positions of the tokens compared by cosine, or None."""
        n = min(ref_labels.shape[0], tgt_labels.shape[0])
        in_scope = scope_mask(ref_labels[:n], self.scope) & scope_mask(tgt_labels[:n], self.scope)
        if ref_ids is not None and tgt_ids is not None:
            same = torch.tensor([int(a) == int(b) for a, b in zip(ref_ids[:n], tgt_ids[:n])], dtype=torch.bool)
            return in_scope & same
        eos = int(TokenClass.APPENDED_EOS)
        if int((ref_labels != eos).sum()) != int((tgt_labels != eos).sum()):
            return None
        return in_scope & (ref_labels[:n] == tgt_labels[:n])

    def add_prompt(self, ref_hidden: torch.Tensor, tgt_hidden: torch.Tensor, ref_labels: torch.Tensor,
                   tgt_labels: torch.Tensor, prompt: str | None = None, ref_ids: Sequence[int] | None = None,
                   tgt_ids: Sequence[int] | None = None) -> None:
        """Accumulate one prompt (``[T, D]`` or ``[L, T, D]`` hidden states; never modified or kept).

        ``*_labels``: int64 ``[T]`` token classes; ``*_ids``: token ids when known (for alignment).
        Inputs are validated first: on an error (shapes, labels, NaN/Inf) nothing of the prompt is recorded.
        """
        ref_own = self._check(ref_hidden, ref_labels, ref_ids, "ref")
        tgt = self._check(tgt_hidden, tgt_labels, tgt_ids, "tgt")
        # the reference as paired with each target layer: [L, T, D] (a broadcast view for a fixed layer)
        ref = ref_own.expand(len(self.layers), -1, -1) if self.reference_layer is not None else ref_own
        index = self._prompts
        where = f"prompt #{index}" + (f" {_short(prompt)!r}" if prompt else "")
        notes: list[str] = []

        m_ref = scope_mask(ref_labels, self.scope)
        m_tgt = scope_mask(tgt_labels, self.scope)
        flags = None
        if int(m_ref.sum()) >= 2 and int(m_tgt.sum()) >= 2:
            s_ref = _std_tokens(ref_own[:, m_ref])  # [1, D] for a fixed reference layer: broadcast
            s_tgt = _std_tokens(tgt[:, m_tgt])
            flags = _ratio_flags(s_ref, s_tgt, self.thresholds)
        else:
            notes.append(f"{where}: fewer than 2 {self.scope!r} tokens (reference {int(m_ref.sum())}, target "
                         f"{int(m_tgt.sum())}); not used for the consistent/prompt-specific split")

        aligned = self._aligned(ref_labels, tgt_labels, ref_ids, tgt_ids)
        cos_sum = torch.zeros(len(self.layers), dtype=_F64)
        cos_n = torch.zeros(len(self.layers), dtype=torch.int64)
        cap_sum = torch.zeros(len(self.primary), dtype=_F64)
        cap_n = torch.zeros(len(self.primary), dtype=torch.int64)
        prompt_cos = math.nan
        if aligned is None:
            notes.append(f"{where}: reference and target token sequences differ in length ({ref.shape[1]} vs "
                         f"{tgt.shape[1]}) and no token ids are known; no per-token cosine")
        elif bool(aligned.any()):
            n = aligned.shape[0]
            cos = dit_mod.token_cosine64(ref[:, :n][:, aligned], tgt[:, :n][:, aligned])  # [L, n]
            ok = torch.isfinite(cos)
            cos_sum = torch.where(ok, cos, torch.zeros_like(cos)).sum(1)
            cos_n = ok.sum(1)
            j0 = self._pidx["tgt"][0]
            if int(cos_n[j0]):
                prompt_cos = float(cos_sum[j0] / cos_n[j0])
            if self._dit is not None:
                for i, j in enumerate(self._pidx["tgt"]):
                    fa = self._dit.features(ref[j, :n][aligned])
                    fb = self._dit.features(tgt[j, :n][aligned])
                    cc = dit_mod.token_cosine64(fa, fb)
                    okc = torch.isfinite(cc)
                    cap_sum[i] = cc[okc].sum()
                    cap_n[i] = int(okc.sum())

        # record (inputs were validated above, so the statistics updates cannot fail half-way)
        self._update("ref", ref_own, ref_labels, m_ref)
        self._update("tgt", tgt, tgt_labels, m_tgt)
        if flags is not None:
            self._flags.append(flags)
        self._cos_sum += cos_sum
        self._cos_n += cos_n
        self._cap_sum += cap_sum
        self._cap_n += cap_n
        self._prompt_cos.append((index, prompt or "", prompt_cos))
        self._notes.extend(notes)
        self._prompts += 1

    # ------------------------------------------------------------------ finish
    def _scope_stats(self, side: str, k: int) -> DimStats:
        """Scope statistics of ``side`` at HF layer ``k``."""
        if k in self._primary[side]:
            return self._full[side][self._primary[side].index(k)]
        return _slice_stats(self._bulk[side], self._sidx[side].index(self._layers[side].index(k)), self.dim)

    def _classes(self, side: str, k: int) -> dict[str, tuple[int, torch.Tensor]]:
        """Per token class of ``side`` at HF layer ``k``: token count and per-dim mean."""
        j = self._layers[side].index(k)
        out = {}
        for c in TokenClass:
            n = int(self._ccount[side][c])
            mean = self._csum[side][c, j] / n if n else torch.full((self.dim,), math.nan, dtype=_F64)
            out[c.name.lower()] = (n, mean)
        return out

    def finish(self, reference_model: str = "reference", target_model: str = "target") -> AnalysisResult:
        """Compare the accumulated statistics (the analysis itself stays usable: more prompts may follow)."""
        if self._prompts == 0:
            raise ValueError("finish: no prompts were analysed")
        th = self.thresholds
        warnings: list[str] = []
        flags = torch.stack(self._flags) if self._flags else None  # [P, L, D]
        results: dict[int, LayerResult] = {}
        for j, k in enumerate(self.layers):
            rk = k if self.reference_layer is None else self.reference_layer
            rs, ts = self._scope_stats("ref", rk), self._scope_stats("tgt", k)
            rc, tc = self._classes("ref", rk), self._classes("tgt", k)
            for name, st in (("reference", rs), ("target", ts)):
                if st.count < 2:
                    raise ValueError(
                        f"finish: the {name} has only {st.count} token(s) in the {self.scope!r} scope over "
                        f"{self._prompts} prompt(s); need at least 2 (add prompts with real content, or use "
                        "token scope 'no_sink' or 'all')")
            comp = compare(rs, ts, th)
            if flags is not None:
                consistent, specific, freq = consistency(flags[:, j])
            else:
                consistent, specific, freq = [], [], torch.zeros(self.dim)
            n_cos = int(self._cos_n[j])
            cos = float(self._cos_sum[j] / n_cos) if n_cos else math.nan
            res = LayerResult(
                layer=k, reference_layer=rk, comparison=comp, reference=rs, target=ts,
                reference_classes=rc, target_classes=tc,
                consistent=consistent, prompt_specific=specific, frequency=freq,
                flag_prompts=0 if flags is None else int(flags.shape[0]), cosine=cos, cosine_tokens=n_cos,
                verdict=verdict(cos, comp.std_pearson, comp.mean_pearson, len(comp.outliers)))
            if self._dit is not None:
                res.sensitivity = self._dit.sensitivity()
                res.influence = self._dit.sensitivity(sigma_ref=comp.sigma_ref)
                rows = dit_mod.rank_dims(res.influence, comp.log_ratio, top=_TOP_ROWS)
                for row in rows:  # rank_dims names its weights 'sensitivity': here they are s_d·σ_ref,d
                    row["influence"] = row.pop("sensitivity")
                    row["sensitivity"] = float(res.sensitivity[row["dim"]])
                    row["sigma_ref"] = float(comp.sigma_ref[row["dim"]])
                res.dit_ranking = rows
                if k in self.primary:
                    i = self.primary.index(k)
                    n_cap = int(self._cap_n[i])
                    res.caption_cosine = float(self._cap_sum[i] / n_cap) if n_cap else math.nan
            results[k] = res
        first = results[self.primary[0]].comparison
        for name, count in (("reference", first.count_ref), ("target", first.count_tgt)):
            if count < th.min_tokens:
                warnings.append(f"only {count} {self.scope!r} tokens for the {name} (fewer than {th.min_tokens}): "
                                "per-dim σ, ratios and outlier lists are noisy; add prompts")
        if flags is None:
            warnings.append("no prompt had ≥ 2 scope tokens on both sides: "
                            "the consistent/prompt-specific split is empty")
        if not int(self._cos_n[self._pidx["tgt"][0]]):
            warnings.append("no aligned tokens were found: the cosine (and the verdict) is n/a")
        warnings.extend(self._notes)
        counts = {name: {c.name.lower(): int(self._ccount[side][c]) for c in TokenClass}
                  for name, side in (("reference", "ref"), ("target", "tgt"))}
        return AnalysisResult(
            layers=list(self.layers), results=results, report_layer=self.primary[0], scope=self.scope,
            thresholds=th, prompt_count=self._prompts, class_counts=counts, warnings=warnings,
            prompt_cosines=list(self._prompt_cos), reference_model=str(reference_model),
            target_model=str(target_model), dit_eps=None if self._dit is None else self._dit.eps,
            reference_layer=self.reference_layer)
