"""The markdown report of an analysis: summary, verdict, top dims, consistency, token classes, the
DiT view, the layer sweep and how to use the table. Each section is one function of the
:class:`~dimfix.result.AnalysisResult`."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import rules
from .result import AnalysisResult, LayerResult
from .tokens import TokenClass

__all__ = ["report_markdown"]

TOP_ROWS = 20
_MAX_LISTED = 60


def short(text: str | None, n: int = 48) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis."""
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def pair_label(layer: int, reference_layer: int) -> str:
    """``layer k`` for a same-layer pair, else ``target layer k vs reference layer r``."""
    if layer == reference_layer:
        return f"layer {layer}"
    return f"target layer {layer} vs reference layer {reference_layer}"


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


def _summary(r: AnalysisResult, res: LayerResult) -> list[str]:
    c, th = res.comparison, r.thresholds
    L, R = res.layer, res.reference_layer
    layers = (f"- Layer: HF `hidden_states[{L}]`" if R == L else
              f"- Layers: reference HF `hidden_states[{R}]`, target HF `hidden_states[{L}]`")
    out = [f"# Dimension analysis: {r.target_model} vs {r.reference_model}", "",
           f"- Reference: **{r.reference_model}**; target: **{r.target_model}**",
           layers + (f" (layer sweep over {len(r.layers)} target layers)" if r.is_sweep else ""),
           f"- Token scope: `{r.token_scope}`; prompts: {r.prompt_count}; tokens in scope: "
           f"{c.count_ref} (reference), {c.count_tgt} (target)",
           f"- Thresholds: τ = {th.outlier_ratio:g}, dead σ < {th.dead_abs:g}, "
           f"hyperactive σ > {th.hyper_mult:g} × median σ", "",
           "| Token class | Reference tokens | Target tokens |", "|---|---|---|"]
    for name in r.class_counts["reference"]:
        out.append(f"| {name} | {r.class_counts['reference'][name]} | {r.class_counts['target'][name]} |")
    out.append("")
    if r.warnings:
        out += ["## Warnings", ""] + [f"- {w}" for w in r.warnings] + [""]
    return out


def _verdict(r: AnalysisResult, res: LayerResult) -> list[str]:
    c, tau = res.comparison, r.thresholds.outlier_ratio
    ratio = c.ratio.double()
    return [f"## Verdict ({pair_label(res.layer, res.reference_layer)})", "", res.verdict.to_markdown(), "",
            f"Cosine = mean per-token cosine of {res.cosine_tokens} aligned tokens in scope; std / mean "
            "correlation = Pearson correlation of the per-dim σ / means; outlier dims = dims with "
            f"σ_tgt/σ_ref > {tau:g} or < 1/{tau:g}.", "",
            f"Std ratio σ_tgt/σ_ref: median {_fmt(float(rules.median(ratio)))}, min {_fmt(float(ratio.min()))}, "
            f"max {_fmt(float(ratio.max()))}; outliers high {len(c.outlier_high)}, low {len(c.outlier_low)}; "
            f"Spearman of σ {_fmt(c.std_spearman)}, of means {_fmt(c.mean_spearman)}.", "",
            f"Dead dims: target-only {_listing(c.dead_target_only)}; reference-only "
            f"{_listing(c.dead_reference_only)}. Hyperactive dims: target-only {_listing(c.hyper_target_only)}; "
            f"reference-only {_listing(c.hyper_reference_only)}; shared {_listing(c.hyper_shared)}.", ""]


def _top_dims(res: LayerResult) -> list[str]:
    out = ["## Most different dimensions", "",
           "| Dim | σ_ref | σ_tgt | Ratio | μ_ref | μ_tgt | Flagged in prompts |", "|---|---|---|---|---|---|---|"]
    for row in res.comparison.top(TOP_ROWS):
        d = row["dim"]
        freq = f"{100 * float(res.frequency[d]):.0f}%" if res.flag_prompts else "n/a"
        out.append(f"| {d} | {_fmt(row['sigma_ref'])} | {_fmt(row['sigma_tgt'])} | {_fmt(row['ratio'])} | "
                   f"{_fmt(row['mean_ref'])} | {_fmt(row['mean_tgt'])} | {freq} |")
    return out + [""]


def _consistency(r: AnalysisResult, res: LayerResult) -> list[str]:
    out = ["## Consistent vs prompt-specific outlier dims", "",
           f"Per-prompt flags from {res.flag_prompts} prompt(s) with ≥ 2 scope tokens on both sides. "
           "Consistent = flagged in ≥ 50% of them (a property of the encoder: a fix table helps); "
           "prompt-specific = flagged in at least one but fewer (content-dependent: a fix may hurt).", "",
           f"- Consistent ({len(res.consistent)}): {_listing(res.consistent)}",
           f"- Prompt-specific ({len(res.prompt_specific)}): {_listing(res.prompt_specific)}", ""]
    if r.prompt_cosines:
        worst = sorted(r.prompt_cosines, key=lambda t: (t[2] if math.isfinite(t[2]) else -math.inf))[:5]
        out += ["Lowest per-prompt cosines: " + "; ".join(f"#{i} {short(p, 40)!r} {_fmt(v)}" for i, p, v in worst),
                ""]
    return out


def _class_notes(r: AnalysisResult, res: LayerResult) -> list[str]:
    lines = []
    for cls in (TokenClass.SINK, TokenClass.TEMPLATE, TokenClass.APPENDED_EOS):
        parts = []
        for name, classes in ((r.reference_model, res.reference_classes), (r.target_model, res.target_classes)):
            count, mean = classes[cls.name.lower()]
            if count == 0:
                continue
            top = torch.sort(-mean.abs(), stable=True).indices[:5].tolist()
            cells = ", ".join(f"{d} ({float(mean[d]):+.4g})" for d in top)
            parts.append(f"{name}: {count} tokens; largest |mean| dims {cells}")
        if parts:
            lines.append(f"- **{cls.name.lower()}**: " + "; ".join(parts))
    if not lines:
        return []
    return ["## Token classes", "",
            f"Scale for comparison: median per-dim σ of the reference on the {r.token_scope!r} scope "
            f"= {_fmt(res.comparison.median_std_ref)}. Position 0 (sink) is where Qwen3 writes its massive "
            "activations; these tokens are excluded from the 'content' scope.", ""] + lines + [""]


def _dit_view(res: LayerResult) -> list[str]:
    if res.dit_ranking is None:
        return []
    out = ["## DiT-aware view (caption embedder)", "",
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
    return out + [""]


def _sweep_table(r: AnalysisResult, R: int) -> list[str]:
    cross = r.cross_layer()
    if r.reference_layer is None:
        out = ["## Layer sweep", "",
               f"Same layer = reference layer k vs target layer k. vs ref {R} = target layer k vs the "
               f"reference at layer {R} (what the DiT was trained on).", "",
               "| Layer | Outliers (same layer) | Std corr (same layer) | Consistent | "
               f"Outliers (vs ref {R}) | Std corr (vs ref {R}) |", "|---|---|---|---|---|---|"]
        for row in cross:
            lr = r.results[row["layer"]]
            out.append(f"| {row['layer']} | {len(lr.comparison.outliers)} | {_fmt(lr.comparison.std_pearson)} | "
                       f"{len(lr.consistent)} | {row['outliers']} | {_fmt(row['std_pearson'])} |")
        return out
    out = ["## Layer sweep", "", f"Every target layer k vs the reference at layer {R} (what the DiT was trained on).",
           "", "| Target layer | Outlier dims | Std corr | Mean corr | Consistent | Cosine |",
           "|---|---|---|---|---|---|"]
    for row in cross:
        lr = r.results[row["layer"]]
        out.append(f"| {row['layer']} | {row['outliers']} | {_fmt(row['std_pearson'])} | "
                   f"{_fmt(row['mean_pearson'])} | {len(lr.consistent)} | {_fmt(lr.cosine)} |")
    return out


def _sweep(r: AnalysisResult, res: LayerResult) -> list[str]:
    if not r.is_sweep:
        return []
    L, R = res.layer, res.reference_layer
    rec = r.recommended_layer()
    pairs = f"the same layer ({L}) of both encoders" if R == L else f"reference layer {R} with target layer {L}"
    return _sweep_table(r, R) + [
        "", f"**Recommended target layer: {rec}** — fewest outlier dims against the reference at layer "
            f"{R}, ties broken by the highest std correlation. The fix table of this run pairs {pairs}."
        + ("" if rec == L else
           f" For a table of layer {rec}, re-run with target layer {rec} (reference layer {R}) and "
           f"select layer {rec} on the target's conditioning (Hidden Layer Select)."), ""]


def _usage(res: LayerResult) -> list[str]:
    return ["## How to use this table", "",
            "- Connect the FIX_TABLE output (or a saved table from `models/fix_tables`) to **Embedding "
            f"Dimension Fix** on the target encoder's conditioning taken at layer {res.layer}, with the same "
            "token scope.",
            "- Few consistent outliers and a passing verdict: the target is usable as is or with the "
            "default affine fix. Many prompt-specific outliers: prefer a lower fix strength.",
            "- Re-run with more prompts when a warning says there are too few tokens.", ""]


def report_markdown(result: AnalysisResult) -> str:
    """The report of ``result`` at its report layer (summary, verdict, top dims, consistency, token
    classes, DiT view, layer sweep, usage)."""
    res = result.result()
    parts = (_summary(result, res), _verdict(result, res), _top_dims(res), _consistency(result, res),
             _class_notes(result, res), _dit_view(res), _sweep(result, res), _usage(res))
    return "\n".join(line for part in parts for line in part)
