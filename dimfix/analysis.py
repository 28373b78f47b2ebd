"""Corpus analysis: stream prompts' hidden states, compare two encoders, report, build a fix table.

:class:`CorpusAnalysis` receives, prompt by prompt, the hidden states of a *reference* encoder (what
the DiT was trained on) and of a *target* encoder (the substitute) for the same prompt, with their
token classes (``dimfix.tokens``). It keeps only running statistics — the hidden states are not
retained after :meth:`CorpusAnalysis.add_prompt` returns — and :meth:`CorpusAnalysis.finish`
turns them into an :class:`~dimfix.result.AnalysisResult` (comparisons, verdict, fix table; the
report is :mod:`dimfix.report`).

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

Conditioning pairs
    :func:`analyze_conditioning_pairs` feeds two CONDITIONINGs produced elsewhere, paired sequence by
    sequence (token classes from the Z-Image template by position).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import conditioning as cond_utils
from . import dit as dit_mod
from . import rules
from .compare import compare, consistency, verdict
from .config import Thresholds
from .report import short
from .result import AnalysisResult, LayerResult
from .stats import DEFAULT_SAMPLE_ROWS, DimStats
from .tokens import SCOPES, TokenClass, classify_positions, scope_mask

__all__ = ["CorpusAnalysis", "AnalysisResult", "LayerResult", "DEFAULT_LAYER", "analyze_conditioning_pairs"]

#: The Z-Image default: HF ``hidden_states[-2]`` of Qwen3-4B.
DEFAULT_LAYER = -2
_F64 = torch.float64
_TOP_ROWS = 20


def _std_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per-layer, per-dim std (ddof=1) of ``x`` ``[L, n, D]`` (any float dtype) over its tokens, float64."""
    x64 = x.to(_F64)
    d = x64 - x64.mean(1, keepdim=True)
    return (d.mul_(d).sum(1) / (x64.shape[1] - 1)).sqrt_()


def _ratio_flags(s_ref: torch.Tensor, s_tgt: torch.Tensor, th: Thresholds) -> torch.Tensor:
    """Two-sided outlier flags ``[L, D]`` from per-layer σ ``[L, D]`` (``s_ref`` may be ``[1, D]``)."""
    high, low = rules.outliers(rules.std_ratio(s_tgt, s_ref, th.eps_rel), th.outlier_ratio)
    return high | low


class _Side:
    """The running statistics of one encoder over its stacked layers ``layers``.

    Scope statistics per layer: full :class:`DimStats` (with a percentile sample) for the primary
    layers; moments only for the others, all of them as one ``[L' × D]``-wide :class:`DimStats` (one
    vectorised update per prompt). Per token class: the token count and the per-layer sum (for means).
    """

    def __init__(self, dim: int, layers: list[int], primary: list[int], sample_rows: int, seed: int) -> None:
        self.dim, self.layers, self.primary = dim, list(layers), list(primary)
        self.primary_index = [self.layers.index(k) for k in self.primary]
        self._others = [j for j, k in enumerate(self.layers) if k not in self.primary]
        self._full = [DimStats(dim, sample_rows, seed) for _ in self.primary]
        self._bulk = DimStats(dim * len(self._others), 0, seed) if self._others else None
        self._class_sum = torch.zeros(len(TokenClass), len(self.layers), dim, dtype=_F64)
        self._class_count = torch.zeros(len(TokenClass), dtype=torch.int64)

    def update(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        """Accumulate one prompt: ``hidden`` ``[L, T, D]``, class ``labels`` ``[T]``, scope ``mask`` ``[T]``."""
        if bool(mask.any()):
            for stats, j in zip(self._full, self.primary_index):
                stats.update(hidden[j], mask)
            if self._others:
                x = hidden[self._others].permute(1, 0, 2).reshape(hidden.shape[1], -1)
                self._bulk.update(x, mask)
        onehot = torch.nn.functional.one_hot(labels.to(torch.int64), len(TokenClass)).to(_F64)  # [T, C]
        self._class_sum += torch.einsum("tc,ltd->cld", onehot, hidden.to(_F64))
        self._class_count += onehot.sum(0).to(torch.int64)

    def scope_stats(self, k: int) -> DimStats:
        """Scope statistics at HF layer ``k`` (moments only for a non-primary layer)."""
        if k in self.primary:
            return self._full[self.primary.index(k)]
        big = self._bulk
        out = DimStats(self.dim, sample_rows=0, seed=big.seed)
        if big.count:
            j = self._others.index(self.layers.index(k))
            sl = slice(j * self.dim, (j + 1) * self.dim)
            out.count = big.count
            out.mean, out.m2, out.m3, out.m4 = (t[sl].clone() for t in (big.mean, big.m2, big.m3, big.m4))
            out.min, out.max = big.min[sl].clone(), big.max[sl].clone()
        return out

    def classes(self, k: int) -> dict[str, tuple[int, torch.Tensor]]:
        """Per token class at HF layer ``k``: token count and per-dim mean (NaN when empty)."""
        j = self.layers.index(k)
        out = {}
        for c in TokenClass:
            n = int(self._class_count[c])
            mean = self._class_sum[c, j] / n if n else torch.full((self.dim,), math.nan, dtype=_F64)
            out[c.name.lower()] = (n, mean)
        return out

    def counts(self) -> dict[str, int]:
        return {c.name.lower(): int(self._class_count[c]) for c in TokenClass}


class _Mean:
    """Running means of ``n`` quantities over their finite values."""

    def __init__(self, n: int) -> None:
        self.total = torch.zeros(n, dtype=_F64)
        self.count = torch.zeros(n, dtype=torch.int64)

    def add(self, values: torch.Tensor) -> None:
        """Add ``values`` ``[n, m]`` (NaN entries are ignored)."""
        ok = torch.isfinite(values)
        self.total += torch.where(ok, values, torch.zeros_like(values)).sum(1)
        self.count += ok.sum(1)

    def value(self, i: int) -> float:
        n = int(self.count[i])
        return float(self.total[i] / n) if n else math.nan


class CorpusAnalysis:
    """Streaming analysis of a prompt corpus encoded by a reference and a target encoder.

    Args:
        dim: hidden size ``D`` (both encoders).
        layers: HF ``hidden_states`` indices stacked on axis 0 of the target's hidden tensor
            (``[L, T, D]``) — and of the reference's unless ``reference_layer`` is given; ``None`` = one
            layer, HF -2, given as ``[T, D]``.
        thresholds: classification thresholds (τ etc.).
        token_scope: token scope of the comparison: ``"content"`` (default), ``"no_sink"`` or ``"all"``.
        primary_layers: target layers that keep percentile samples and get the caption-space cosine
            (default: all). The first one is the report layer.
        sample_rows, seed: passed to the statistics (percentile sample size, sampling seed).
        reference_layer: HF index of the reference's hidden states when the reference is measured at
            this one layer (``ref_hidden`` ``[T, D]`` or ``[1, T, D]``) and every target layer is paired
            with it; ``None`` (default) = the reference is stacked like the target and layer ``k`` is
            paired with layer ``k``.
    """

    def __init__(self, dim: int, layers: Sequence[int] | None = None, thresholds: Thresholds = Thresholds(),
                 token_scope: str = "content", primary_layers: Sequence[int] | None = None,
                 sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0,
                 reference_layer: int | None = None) -> None:
        if int(dim) < 1:
            raise ValueError(f"CorpusAnalysis: dim must be >= 1, got {dim}")
        if token_scope not in SCOPES:
            raise ValueError(f"CorpusAnalysis: token scope must be one of {list(SCOPES)}, got {token_scope!r}")
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
        self.token_scope = token_scope
        self.sample_rows = int(sample_rows)
        self.seed = int(seed)
        fixed = [self.reference_layer] if self.reference_layer is not None else None
        self._sides = {"ref": _Side(self.dim, fixed or self.layers, fixed or self.primary, self.sample_rows, self.seed),
                       "tgt": _Side(self.dim, self.layers, self.primary, self.sample_rows, self.seed)}
        self._flags: list[torch.Tensor] = []  # bool [L, D] per prompt with flags
        self._cos = _Mean(len(self.layers))  # aligned-token cosine per target layer
        self._cap = _Mean(len(self.primary))  # caption-space cosine per primary layer
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
            raise ValueError(f"the caption embedder (input 'model') takes {cap.in_dim}-dim caption features but the "
                             f"encoders have {self.dim} dims (connect the Z-Image model this text encoder is meant "
                             "for)")
        if self._prompts:
            self._notes.append("DiT weights were set after the first prompt: the caption-space cosine covers "
                               "only later prompts")
        self._dit = cap

    @property
    def prompt_count(self) -> int:
        return self._prompts

    # ------------------------------------------------------------------ per prompt
    def _check(self, hidden: torch.Tensor, labels: torch.Tensor, ids: Sequence[int] | None, name: str,
               num: int) -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError(f"add_prompt: {name}_hidden must be a floating-point tensor, got "
                            f"{type(hidden).__name__ if not isinstance(hidden, torch.Tensor) else hidden.dtype}")
        layers = self._sides[name].layers
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
            raise ValueError(f"add_prompt: {name}_hidden of prompt #{num} contains {bad} NaN/Inf value(s) "
                             "(fp16 overflow? encode in bf16 or fp32); nothing from this prompt was recorded")
        return hidden.detach().cpu()  # a no-op for CPU tensors; all statistics live on the CPU

    def _aligned(self, ref_labels: torch.Tensor, tgt_labels: torch.Tensor, ref_ids: Sequence[int] | None,
                 tgt_ids: Sequence[int] | None) -> torch.Tensor | None:
        """Bool mask over the first ``min(T, T2)`` positions of the tokens compared by cosine, or None."""
        n = min(ref_labels.shape[0], tgt_labels.shape[0])
        in_scope = scope_mask(ref_labels[:n], self.token_scope) & scope_mask(tgt_labels[:n], self.token_scope)
        if ref_ids is not None and tgt_ids is not None:
            same = torch.tensor([int(a) == int(b) for a, b in zip(ref_ids[:n], tgt_ids[:n])], dtype=torch.bool)
            return in_scope & same
        eos = int(TokenClass.APPENDED_EOS)
        if int((ref_labels != eos).sum()) != int((tgt_labels != eos).sum()):
            return None
        return in_scope & (ref_labels[:n] == tgt_labels[:n])

    def _cosines(self, ref: torch.Tensor, tgt: torch.Tensor, aligned: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cosines ``[L, n]`` of the aligned tokens, and in caption space ``[P, n]`` (P = 0 without DiT)."""
        n = aligned.shape[0]
        a, b = ref[:, :n][:, aligned], tgt[:, :n][:, aligned]
        cos = dit_mod.token_cosine64(a, b)
        if self._dit is None:
            return cos, torch.zeros((len(self.primary), 0), dtype=_F64)
        cap = [dit_mod.token_cosine64(self._dit.features(a[j]), self._dit.features(b[j]))
               for j in self._sides["tgt"].primary_index]
        return cos, torch.stack(cap)

    def add_prompt(self, ref_hidden: torch.Tensor, tgt_hidden: torch.Tensor, ref_labels: torch.Tensor,
                   tgt_labels: torch.Tensor, prompt: str | None = None, ref_ids: Sequence[int] | None = None,
                   tgt_ids: Sequence[int] | None = None, index: int | None = None) -> None:
        """Accumulate one prompt (``[T, D]`` or ``[L, T, D]`` hidden states; never modified or kept).

        ``*_labels``: int64 ``[T]`` token classes; ``*_ids``: token ids when known (for alignment);
        ``index``: the prompt's number in the corpus (default: the order of arrival), used in notes and reports.
        Inputs are validated first: on an error (shapes, labels, NaN/Inf) nothing of the prompt is recorded.
        """
        num = self._prompts if index is None else int(index)
        ref_own = self._check(ref_hidden, ref_labels, ref_ids, "ref", num)
        tgt = self._check(tgt_hidden, tgt_labels, tgt_ids, "tgt", num)
        # the reference as paired with each target layer: [L, T, D] (a broadcast view for a fixed layer)
        ref = ref_own.expand(len(self.layers), -1, -1) if self.reference_layer is not None else ref_own
        where = f"prompt #{num}" + (f" {short(prompt)!r}" if prompt else "")
        notes: list[str] = []
        m_ref, m_tgt = scope_mask(ref_labels, self.token_scope), scope_mask(tgt_labels, self.token_scope)
        flags = None
        if int(m_ref.sum()) >= 2 and int(m_tgt.sum()) >= 2:
            # [1, D] reference σ for a fixed reference layer: broadcast
            flags = _ratio_flags(_std_tokens(ref_own[:, m_ref]), _std_tokens(tgt[:, m_tgt]), self.thresholds)
        else:
            notes.append(f"{where}: fewer than 2 {self.token_scope!r} tokens (reference {int(m_ref.sum())}, target "
                         f"{int(m_tgt.sum())}); not used for the consistent/prompt-specific split")
        aligned = self._aligned(ref_labels, tgt_labels, ref_ids, tgt_ids)
        cos = torch.zeros((len(self.layers), 0), dtype=_F64)
        cap = torch.zeros((len(self.primary), 0), dtype=_F64)
        if aligned is None:
            notes.append(f"{where}: reference and target token sequences differ in length ({ref.shape[1]} vs "
                         f"{tgt.shape[1]}) and no token ids are known; no per-token cosine")
        elif bool(aligned.any()):
            cos, cap = self._cosines(ref, tgt, aligned)
        # record (inputs were validated above, so the statistics updates cannot fail half-way)
        self._sides["ref"].update(ref_own, ref_labels, m_ref)
        self._sides["tgt"].update(tgt, tgt_labels, m_tgt)
        if flags is not None:
            self._flags.append(flags)
        self._cos.add(cos)
        self._cap.add(cap)
        first = cos[self._sides["tgt"].primary_index[0]]
        first = first[torch.isfinite(first)]
        self._prompt_cos.append((num, prompt or "", float(first.mean()) if first.numel() else math.nan))
        self._notes.extend(notes)
        self._prompts += 1

    # ------------------------------------------------------------------ finish
    def _layer_result(self, j: int, k: int, flags: torch.Tensor | None) -> LayerResult:
        rk = k if self.reference_layer is None else self.reference_layer
        rs, ts = self._sides["ref"].scope_stats(rk), self._sides["tgt"].scope_stats(k)
        for name, st in (("reference", rs), ("target", ts)):
            if st.count < 2:
                raise ValueError(
                    f"finish: the {name} has only {st.count} token(s) in the {self.token_scope!r} scope over "
                    f"{self._prompts} prompt(s); need at least 2 (add prompts with real content, or use "
                    "token scope 'no_sink' or 'all')")
        comp = compare(rs, ts, self.thresholds)
        consistent, specific, freq = consistency(flags[:, j]) if flags is not None else ([], [], torch.zeros(self.dim))
        cos = self._cos.value(j)
        res = LayerResult(
            layer=k, reference_layer=rk, comparison=comp, reference=rs, target=ts,
            reference_classes=self._sides["ref"].classes(rk), target_classes=self._sides["tgt"].classes(k),
            consistent=consistent, prompt_specific=specific, frequency=freq,
            flag_prompts=0 if flags is None else int(flags.shape[0]), cosine=cos, cosine_tokens=int(self._cos.count[j]),
            verdict=verdict(cos, comp.std_pearson, comp.mean_pearson, len(comp.outliers)))
        if self._dit is not None:
            self._dit_view(res, k)
        return res

    def _dit_view(self, res: LayerResult, k: int) -> None:
        comp = res.comparison
        res.sensitivity = self._dit.sensitivity()
        res.influence = self._dit.sensitivity(sigma_ref=comp.sigma_ref)
        rows = dit_mod.rank_dims(res.influence, comp.log_ratio, top=_TOP_ROWS)
        for row in rows:  # rank_dims names its weights 'sensitivity': here they are s_d·σ_ref,d
            row["influence"] = row.pop("sensitivity")
            row["sensitivity"] = float(res.sensitivity[row["dim"]])
            row["sigma_ref"] = float(comp.sigma_ref[row["dim"]])
        res.dit_ranking = rows
        if k in self.primary:
            res.caption_cosine = self._cap.value(self.primary.index(k))

    def _warnings(self, first: LayerResult, flags: torch.Tensor | None) -> list[str]:
        th, warnings = self.thresholds, []
        for name, count in (("reference", first.comparison.count_ref), ("target", first.comparison.count_tgt)):
            if count < th.min_tokens:
                warnings.append(f"only {count} {self.token_scope!r} tokens for the {name} (fewer than "
                                f"{th.min_tokens}): per-dim σ, ratios and outlier lists are noisy; add prompts")
        if flags is None:
            warnings.append("no prompt had ≥ 2 scope tokens on both sides: "
                            "the consistent/prompt-specific split is empty")
        if not int(self._cos.count[self._sides["tgt"].primary_index[0]]):
            warnings.append("no aligned tokens were found: the cosine (and the verdict) is n/a")
        return warnings + self._notes

    def finish(self, reference_model: str = "reference", target_model: str = "target") -> AnalysisResult:
        """Compare the accumulated statistics (the analysis itself stays usable: more prompts may follow)."""
        if self._prompts == 0:
            raise ValueError("finish: no prompts were analysed")
        flags = torch.stack(self._flags) if self._flags else None  # [P, L, D]
        results = {k: self._layer_result(j, k, flags) for j, k in enumerate(self.layers)}
        return AnalysisResult(
            layers=list(self.layers), results=results, report_layer=self.primary[0], token_scope=self.token_scope,
            thresholds=self.thresholds, prompt_count=self._prompts,
            class_counts={"reference": self._sides["ref"].counts(), "target": self._sides["tgt"].counts()},
            warnings=self._warnings(results[self.primary[0]], flags), prompt_cosines=sorted(self._prompt_cos),
            reference_model=str(reference_model), target_model=str(target_model),
            dit_eps=None if self._dit is None else self._dit.eps, reference_layer=self.reference_layer)


def analyze_conditioning_pairs(reference: Any, target: Any, *, layer: int = DEFAULT_LAYER,
                               reference_layer: int = DEFAULT_LAYER, thresholds: Thresholds = Thresholds(),
                               token_scope: str = "content", cap_weights: tuple | None = None, node: str = "",
                               step: Callable[[int, int], None] | None = None) -> CorpusAnalysis:
    """The analysis of two CONDITIONINGs produced elsewhere, paired sequence by sequence.

    Sequence ``i`` of ``reference`` (every batch row of every entry, :func:`dimfix.conditioning.sequences`)
    is paired with sequence ``i`` of ``target``; both must hold as many sequences, all of one width.
    Token classes come from the Z-Image template by position; a target exactly one token longer than
    its reference is taken to end with an appended ``<|endoftext|>`` (as Qwen3-Embedding's tokenizer
    adds). A conditioning holds one layer: ``layer`` / ``reference_layer`` (HF indices) are recorded.
    ``cap_weights``: ``(gain, weight, bias, eps)`` of the caption embedder for the DiT view;
    ``step(pairs done, pairs)`` is called after each pair (progress, interruption); ``node`` prefixes
    error messages.
    """
    where = f"{node}: " if node else ""
    ref_items = cond_utils.sequences(reference, "reference_conditioning", node)
    tgt_items = cond_utils.sequences(target, "target_conditioning", node)
    if len(ref_items) != len(tgt_items):
        raise ValueError(f"{where}'reference_conditioning' holds {len(ref_items)} sequences but "
                         f"'target_conditioning' {len(tgt_items)}; they are paired one to one")
    widths = {int(x.shape[-1]) for x in ref_items} | {int(x.shape[-1]) for x in tgt_items}
    if len(widths) != 1:
        raise ValueError(f"{where}conditioning widths differ (reference {ref_items[0].shape[-1]}, target "
                         f"{tgt_items[0].shape[-1]}, all: {sorted(widths)}); both must come from encoders "
                         "of the same hidden size")
    an = CorpusAnalysis(widths.pop(), layers=[int(layer)], thresholds=thresholds, token_scope=token_scope,
                        reference_layer=None if int(reference_layer) == int(layer) else int(reference_layer))
    if cap_weights is not None:
        an.set_dit(*cap_weights)
    for i, (r, t) in enumerate(zip(ref_items, tgt_items)):
        r_lab = classify_positions(r.shape[0])
        t_lab = classify_positions(t.shape[0], appended_eos=t.shape[0] == r.shape[0] + 1)
        an.add_prompt(r.unsqueeze(0), t.unsqueeze(0), r_lab, t_lab, prompt=f"conditioning {i}")
        if step is not None:
            step(i + 1, len(ref_items))
    return an
