"""The repair study of an analysis: which fix mode makes the DiT see the reference, measured on held-out prompts.

Per prompt (one layer pair, token ids known) :class:`RepairStudy` accumulates, in float64 and without keeping
token matrices for training prompts: per-token-class statistics of both encoders, the reference's prefix
positions, and the token-aligned pairs of the adapter fit (:class:`dimfix.adapter.AdapterFitter`) — training
prompts (the deterministic split of :func:`dimfix.pairs.is_heldout`) first, then held-out ones: feed the prompts
in :func:`study_order`. Held-out aligned tokens are also kept (float32, at most :data:`HELDOUT_TOKENS_MAX`) to
evaluate every mode once the learned ones are fitted.

:meth:`RepairStudy.finish` fits ``adapter`` / ``adapter_lowrank`` (in the training pairs' reference-σ units) and the
per-class correction, evaluates the per-dim modes of the fix table (applied as the Fix node applies them: to
the table's token scope), ``per_class`` and the adapters on the held-out tokens (standardised and caption-space
cosine next to the seeds' four numbers), and recommends the best passing mode. :func:`fix_function` applies any
mode of a table — including ``auto``, the table's recommendation — to a ``[B, T, D]`` conditioning tensor.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import fixes
from .adapter import AdapterFit, AdapterFitter, apply_affine, apply_lowrank
from .config import Thresholds
from .diagnostics import mixed_dims, shape_flags
from .dit import CapEmbedder
from .evaluate import ModeEvaluator, ModeResult, adapter_mode, classwise_mode, results_markdown
from .fixtable import FixTable
from .pairs import HELDOUT_FRACTION, align_token_ids, is_heldout
from .perclass import ClassCorrection, ClassedStats, PrefixStats, class_corrections
from .tokens import classify_positions, scope_mask

log = logging.getLogger(__name__)

#: Modes learned by the study (stored as table tensors) and the mode that follows the table's recommendation.
LEARNED_MODES = ("per_class", "adapter", "adapter_lowrank")
AUTO = "auto"
#: Per-dim modes of the fix table evaluated next to the learned ones.
EVALUATED_MODES = ("none", "rescale", "mask", "full", "affine", "mask_mean", "clamp_pct")
HELDOUT_TOKENS_MAX = 4096  # 84 MB at width 2560 (target and reference rows, float32)
FALLBACK_MODE = "affine"


@dataclass
class RepairResult:
    """What :meth:`RepairStudy.finish` measured and fitted."""

    results: list[ModeResult] = field(default_factory=list)
    recommended: str = ""
    passed: bool = False
    fits: dict[str, AdapterFit] = field(default_factory=dict)
    correction: ClassCorrection | None = None
    shape_dims: list[int] = field(default_factory=list)
    mixed: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learned modes' tensors for the fix table (see fix_tables/README.md): ``adapter`` always as
        ``W``/``b`` (whatever its fit fell back to), ``adapter_lowrank`` only when it is a low-rank fit."""
        out: dict[str, torch.Tensor] = {}
        full = self.fits.get("adapter")
        if full is not None and full.kind != "identity":
            w, b = full.affine()
            out.update({"adapter_weight": w.float().contiguous(), "adapter_bias": b.float().contiguous()})
        low = self.fits.get("adapter_lowrank")
        if low is not None and low.kind == "lowrank":
            out.update(low.tensors("adapter_lowrank"))
        if self.correction is not None:
            out.update(self.correction.tensors())
        return out

    def extend(self, table: FixTable) -> FixTable:
        """A new table with the learned tensors and the recommendation (the input table is unchanged)."""
        meta = dataclasses.replace(table.meta, recommended_mode=self.recommended)
        return FixTable(table.reference_mean, table.reference_std, table.target_mean, table.target_std,
                        extras={**table.extras, **self.tensors()}, meta=meta)

    def markdown(self) -> str:
        c = self.counts
        lines = ["## Repair modes on held-out prompts", "",
                 f"{c.get('train_prompts', 0)} training and {c.get('held_prompts', 0)} held-out prompts "
                 f"({c.get('train_tokens', 0)} / {c.get('held_tokens', 0)} aligned tokens; "
                 f"{c.get('skipped', 0)} prompts skipped: token ids differ). Each mode is applied to the held-out "
                 "target tokens and compared with the reference's; the verdict needs the standardised (and, with "
                 "the model, caption-space) cosine ≥ 0.99 besides the original four criteria.", ""]
        if self.results:
            lines += [results_markdown(self.results, self.recommended), ""]
        verdict = "passes" if self.passed else "is the closest, but no mode passes"
        lines.append(f"**Recommended mode: `{self.recommended}`** ({verdict}); `auto` in Embedding Dimension Fix "
                     "uses it." if self.recommended else "No recommendation (no held-out tokens).")
        for name, fit in self.fits.items():
            detail = f"rank {fit.rank}" if fit.kind == "lowrank" else f"α {fit.alpha:g}"
            lines.append(f"- `{name}`: {fit.kind} fit, {detail}, held-out relative error {fit.heldout_error:.4g}"
                         + (f" ({'; '.join(fit.notes)})" if fit.notes else ""))
        lines.append(f"- shape defects (skewness / kurtosis beyond sampling error): {len(self.shape_dims)} dims"
                     + (f", e.g. {self.shape_dims[:10]}" if self.shape_dims else ""))
        lines.append(f"- mixed dims (σ matches, aligned tokens decorrelated): {len(self.mixed)}"
                     + (f", e.g. {self.mixed[:10]}" if self.mixed else ""))
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


class RepairStudy:
    """Streaming repair study at one layer pair (see the module docstring)."""

    def __init__(self, dim: int, cap: CapEmbedder | None = None, heldout_fraction: float = HELDOUT_FRACTION) -> None:
        self.dim, self.cap, self.fraction = int(dim), cap, float(heldout_fraction)
        self.fitter = AdapterFitter(self.dim)
        self.ref_classes, self.tgt_classes = ClassedStats(self.dim), ClassedStats(self.dim)
        self.prefix = PrefixStats(self.dim)
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.counts = {"train_prompts": 0, "held_prompts": 0, "train_tokens": 0, "held_tokens": 0, "skipped": 0}

    def add_prompt(self, prompt: str, ref: torch.Tensor, tgt: torch.Tensor, ref_ids: Sequence[int] | None,
                   tgt_ids: Sequence[int] | None, ref_labels: torch.Tensor, tgt_labels: torch.Tensor) -> None:
        """One prompt's hidden states ``[T, D]`` at the studied layers (never modified or kept). Training prompts
        must all come before the held-out ones (:func:`study_order`); otherwise ``ValueError``, nothing recorded."""
        side = "held" if is_heldout(prompt, self.fraction) else "train"
        if side == "train" and self.fitter.stage != "train":
            raise ValueError(f"RepairStudy: training prompt {prompt[:40]!r} after held-out prompts; feed the prompts "
                             "in dimfix.repair.study_order(prompts) (training prompts first)")
        self.ref_classes.update(ref, ref_labels)
        self.tgt_classes.update(tgt, tgt_labels)
        self.prefix.update(ref)
        pair = align_token_ids(tgt_ids, ref_ids) if ref_ids is not None and tgt_ids is not None else None
        if pair is None:
            self.counts["skipped"] += 1
            return
        x, y = tgt[pair[0]], ref[pair[1]]
        (self.fitter.add_heldout if side == "held" else self.fitter.add_train)(x, y)
        self.counts[f"{side}_prompts"] += 1
        self.counts[f"{side}_tokens"] += int(x.shape[0])
        if side == "held" and sum(k[0].shape[0] for k in self.kept) + x.shape[0] <= HELDOUT_TOKENS_MAX:
            self.kept.append((x.float().clone(), y.float().clone(), ref_labels[pair[1]].clone()))

    def finish(self, table: FixTable, thresholds: Thresholds) -> RepairResult:
        res = RepairResult(counts=dict(self.counts))
        res.shape_dims = shape_flags(self.ref_classes.scope(table.meta.token_scope),
                                     self.tgt_classes.scope(table.meta.token_scope)).flagged
        if self.counts["train_tokens"]:
            res.fits = self.fitter.finish()
            res.mixed = mixed_dims(self.fitter.train).mixed  # the per-dim diagonals the fit leaves
        else:
            res.notes.append("no training prompt had token ids matching the reference's: no adapter was fitted")
        res.correction = class_corrections(self.ref_classes, self.tgt_classes, self.prefix, thresholds)
        res.notes += list(res.correction.notes)
        if not self.kept:
            res.notes.append("no held-out prompt had aligned tokens: modes are not evaluated (add prompts)")
            return res
        modes = {m: _table_mode(table, m, thresholds) for m in EVALUATED_MODES}
        modes["per_class"] = classwise_mode(res.correction)
        for name, fit in res.fits.items():  # only what the table stores (see RepairResult.tensors)
            if fit.kind == ("lowrank" if name == "adapter_lowrank" else fit.kind) and fit.kind != "identity":
                modes[name] = adapter_mode(fit)
        ev = ModeEvaluator(modes, table.reference_mean, table.reference_std, self.cap, thresholds)
        for x, y, labels in self.kept:
            ev.update(x, y, labels)
        res.results = ev.results()
        res.recommended, res.passed = ev.recommend(res.results)
        return res


def study_order(prompts: Sequence[str], fraction: float = HELDOUT_FRACTION) -> list[int]:
    """Indices of ``prompts``: the training prompts first, then the held-out ones, each in corpus order."""
    held = [is_heldout(p, fraction) for p in prompts]
    return [i for i, h in enumerate(held) if not h] + [i for i, h in enumerate(held) if h]


def _table_mode(table: FixTable, mode: str, thresholds: Thresholds):
    plan = fixes.plan_fix(table, mode, 1.0, thresholds)
    scope = table.meta.token_scope

    def run(x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        mask = None if labels is None else scope_mask(labels, scope)
        return fixes.apply_plan(x.float(), plan, mask)
    return run


# ---------------------------------------------------------------------------- applying a mode
def resolve_mode(table: FixTable, mode: str) -> str:
    """``auto`` → the table's recommended mode (``affine`` for tables without one); other modes unchanged."""
    if mode != AUTO:
        return mode
    rec = getattr(table.meta, "recommended_mode", "") or ""
    if not rec:
        log.info("fix table has no recommended mode (made before the repair study): 'auto' uses %s", FALLBACK_MODE)
    return rec or FALLBACK_MODE


def _need(table: FixTable, names: Sequence[str], mode: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in table.extras]
    if missing:
        raise ValueError(f"mode {mode!r} needs the fix table tensors {missing}, which this table lacks (made before "
                         "the repair study, or too few aligned tokens to fit it): re-run the Dimension Analyzer, or "
                         "choose a per-dim mode such as 'affine'")
    return [table.extras[n] for n in names]


def fix_function(table: FixTable, mode: str, strength: float, thresholds: Thresholds,
                 token_scope: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``[B, T, D] → new [B, T, D]`` applying ``mode`` (any of :data:`fixes.MODES`,
    :data:`LEARNED_MODES` or ``auto``) at ``strength`` (0 = unchanged, 1 = fully). Per-dim modes act on
    ``token_scope``; ``per_class`` and the adapters act on every token (per class / as fitted)."""
    mode = resolve_mode(table, mode)
    s = float(strength)
    if mode not in LEARNED_MODES:
        plan = fixes.plan_fix(table, mode, s, thresholds)
        return lambda t: fixes.apply_scoped(t, plan, token_scope)
    if mode == "adapter":
        w, b = _need(table, ("adapter_weight", "adapter_bias"), mode)
        learned = lambda t: apply_affine(t, w, b)  # noqa: E731
    elif mode == "adapter_lowrank":
        u, v, mu, c = _need(table, [f"adapter_lowrank_{k}" for k in ("u", "v", "mean", "shift")], mode)
        learned = lambda t: apply_lowrank(t, u, v, mu, c)  # noqa: E731
    else:
        _need(table, ("class_scale", "class_shift"), mode)
        corr = ClassCorrection.from_tensors(table.extras)
        learned = lambda t: corr.apply(t, classify_positions(t.shape[-2]))  # noqa: E731

    def run(t: torch.Tensor) -> torch.Tensor:
        out = learned(t)
        return out if s >= 1.0 else t + (out - t) * s
    return run
