"""Per-token-class corrections: dead-dim-safe moment matching per class and stored prefix vectors.

The sink token, the template tokens and the prompt's own tokens have very different statistics
(the sink carries values near 1e4 in dim 4), so one per-dim table cannot fit all of them. Here each
:class:`~dimfix.tokens.TokenClass` gets its own per-dim ``scale``/``shift``:

- live dims are matched in mean and σ: ``x' = μ_ref + (x - μ_tgt)·σ_ref/σ_tgt``;
- target-dead dims (the dead rule of :func:`dimfix.compare.compare`) go to the reference mean
  (``scale = 0``, ``shift = μ_ref``), never to amplified noise;
- a class with fewer than 2 tokens on either side, and ``APPENDED_EOS`` (the reference has no such
  token), stay unchanged.

In a causal model the first positions (the sink ``<|im_start|>`` and ``user``, ``\\n``) see the same
context for every prompt, so their reference hidden states are constants: :class:`PrefixStats`
measures them (and checks that they really are constant) and the correction can replace those
positions by the stored reference vectors exactly.

Tensors for a fix table (float32, see :meth:`ClassCorrection.tensors`): ``class_scale`` and
``class_shift`` ``[C, D]`` (row ``c`` = ``TokenClass(c)``), ``prefix_reference`` ``[P, D]`` (optional).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .compare import compare
from .config import Thresholds
from .stats import DimStats
from .tokens import TEMPLATE_PREFIX_IDS, TokenClass, classify_positions, scope_mask

_F64 = torch.float64
#: Largest relative spread (max - min over prompts, / RMS of the vector) of a "constant" position.
PREFIX_TOL = 1e-2

__all__ = ["ClassedStats", "ClassCorrection", "PrefixStats", "moment_match", "class_corrections", "apply_classwise",
           "PREFIX_TOL"]


class ClassedStats:
    """One :class:`DimStats` per :class:`TokenClass` (moments; a percentile sample if ``sample_rows``)."""

    def __init__(self, dim: int, sample_rows: int = 0, seed: int = 0) -> None:
        self.dim = int(dim)
        self.by_class = {c: DimStats(dim, sample_rows, seed + int(c)) for c in TokenClass}

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate one prompt's tokens ``x`` ``[T, D]`` with their class ``labels`` ``[T]``."""
        if x.dim() != 2 or labels.shape != x.shape[:1]:
            raise ValueError(f"ClassedStats.update: x must be [T, {self.dim}] with labels [T], got "
                             f"{tuple(x.shape)} and {tuple(labels.shape)}")
        for c, stats in self.by_class.items():
            mask = labels == int(c)
            if bool(mask.any()):
                stats.update(x, mask)

    def scope(self, token_scope: str) -> DimStats:
        """The classes of ``token_scope`` merged (see :data:`dimfix.tokens.SCOPES`)."""
        classes = torch.tensor([int(c) for c in TokenClass], dtype=torch.int64)
        picked = [TokenClass(int(c)) for c in classes[scope_mask(classes, token_scope)]]
        out = DimStats(self.dim, 0)
        for c in picked:
            out = out.merge(self.by_class[c])
        return out


def moment_match(ref: DimStats, tgt: DimStats,
                 thresholds: Thresholds = Thresholds()) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead-dim-safe per-dim ``(scale, shift)`` (float32 ``[D]``) mapping ``tgt``'s moments onto ``ref``'s."""
    comp = compare(ref, tgt, thresholds)
    mu_r, mu_t = ref.mean, tgt.mean
    sd_r, sd_t = ref.std(), tgt.std()
    dead = torch.zeros(ref.dim, dtype=torch.bool)
    dead[comp.dead_tgt] = True
    dead |= ~(sd_t > 0)
    scale = torch.where(dead, torch.zeros_like(sd_r), sd_r / torch.where(dead, torch.ones_like(sd_t), sd_t))
    shift = mu_r - mu_t * scale
    return scale.float(), shift.float()


class PrefixStats:
    """Per-position statistics of the first ``positions`` tokens of every prompt (float64, no rows kept)."""

    def __init__(self, dim: int, positions: int = len(TEMPLATE_PREFIX_IDS)) -> None:
        if int(positions) < 1:
            raise ValueError(f"PrefixStats: positions must be >= 1, got {positions}")
        self.dim, self.positions = int(dim), int(positions)
        self.by_position = [DimStats(self.dim, sample_rows=0) for _ in range(self.positions)]

    def update(self, y: torch.Tensor) -> None:
        """Add one prompt's reference tokens ``y`` (``[T, D]`` or ``[1, T, D]``, T ≥ positions)."""
        t = y[0] if y.dim() == 3 and y.shape[0] == 1 else y
        if t.dim() != 2 or t.shape[0] < self.positions or t.shape[1] != self.dim:
            raise ValueError(f"PrefixStats.update: expected [T >= {self.positions}, {self.dim}] tokens, got "
                             f"{tuple(y.shape)}")
        for p, s in enumerate(self.by_position):
            s.update(t[p:p + 1])

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [P, D] float32, relative spread [P] float32)``; spread = max over dims of
        (max - min) divided by the RMS of the mean vector."""
        if self.by_position[0].count == 0:
            raise ValueError("PrefixStats.vectors: no prompt was added")
        means = torch.stack([s.mean for s in self.by_position])
        spread = torch.stack([(s.max - s.min).max() for s in self.by_position])
        rms = means.square().mean(-1).sqrt().clamp(min=torch.finfo(_F64).tiny)
        return means.float(), (spread / rms).float()


@dataclass(frozen=True)
class ClassCorrection:
    """Per-class ``scale``/``shift`` (float32 ``[C, D]``) and optional ``prefix`` vectors (``[P, D]``)."""

    scale: torch.Tensor
    shift: torch.Tensor
    prefix: torch.Tensor | None = None
    notes: tuple[str, ...] = ()

    def tensors(self) -> dict[str, torch.Tensor]:
        """``class_scale``, ``class_shift`` and (when present) ``prefix_reference``, contiguous float32."""
        out = {"class_scale": self.scale.float().contiguous(), "class_shift": self.shift.float().contiguous()}
        if self.prefix is not None:
            out["prefix_reference"] = self.prefix.float().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ClassCorrection":
        """Read :meth:`tensors` back (shapes validated)."""
        try:
            scale, shift = tensors["class_scale"], tensors["class_shift"]
        except KeyError as err:
            raise ValueError(f"ClassCorrection.from_tensors: missing tensor {err}") from None
        prefix = tensors.get("prefix_reference")
        if scale.dim() != 2 or scale.shape != shift.shape or scale.shape[0] != len(TokenClass):
            raise ValueError(f"ClassCorrection.from_tensors: class_scale/class_shift must both be "
                             f"[{len(TokenClass)}, D], got {tuple(scale.shape)} and {tuple(shift.shape)}")
        if prefix is not None and (prefix.dim() != 2 or prefix.shape[1] != scale.shape[1]):
            raise ValueError(f"ClassCorrection.from_tensors: prefix_reference must be [P, {scale.shape[1]}], got "
                             f"{tuple(prefix.shape)}")
        return cls(scale.float(), shift.float(), None if prefix is None else prefix.float())

    def apply(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`apply_classwise` with this correction."""
        return apply_classwise(x, self.scale, self.shift, labels, self.prefix)


def class_corrections(ref: ClassedStats, tgt: ClassedStats, prefix: PrefixStats | None = None,
                      thresholds: Thresholds = Thresholds(), prefix_tol: float = PREFIX_TOL) -> ClassCorrection:
    """Build the per-class correction from per-class reference and target statistics.

    ``prefix``: the reference's :class:`PrefixStats`; its vectors are stored when every position's
    relative spread is at most ``prefix_tol`` (else a note says why they are not).
    """
    if not isinstance(ref, ClassedStats) or not isinstance(tgt, ClassedStats) or ref.dim != tgt.dim:
        raise ValueError("class_corrections: ref and tgt must be ClassedStats of the same width")
    dim, notes = ref.dim, []
    scale = torch.ones((len(TokenClass), dim))
    shift = torch.zeros((len(TokenClass), dim))
    for c in TokenClass:
        r, t = ref.by_class[c], tgt.by_class[c]
        if c == TokenClass.APPENDED_EOS:
            continue
        if r.count < 2 or t.count < 2:
            notes.append(f"{c.name.lower()}: {min(r.count, t.count)} token(s) on one side; left unchanged")
            continue
        scale[int(c)], shift[int(c)] = moment_match(r, t, thresholds)
    vec = None
    if prefix is not None:
        means, spread = prefix.vectors()
        if float(spread.max()) <= prefix_tol:
            vec = means
        else:
            notes.append(f"prefix positions vary across prompts (relative spread {float(spread.max()):.3g} > "
                         f"{prefix_tol:g}): not stored")
    return ClassCorrection(scale, shift, vec, tuple(notes))


def apply_classwise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, labels: torch.Tensor | None = None,
                    prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``x' = x·scale[class] + shift[class]`` per token of ``x`` ``[..., T, D]``, then the first ``P``
    positions replaced by ``prefix`` when given, the sequence is longer than ``P`` and its labels start
    with the sink and ``P - 1`` template tokens.

    ``labels`` (int64 ``[T]``, TokenClass values) default to the Z-Image template positions. Float32
    compute, a new tensor of ``x``'s dtype; ``x`` is never modified.
    """
    if x.dim() < 2 or x.shape[-1] != scale.shape[-1]:
        raise ValueError(f"per-class correction width {scale.shape[-1]} does not match the embedding "
                         f"{tuple(x.shape)} (expected [..., T, {scale.shape[-1]}])")
    n = x.shape[-2]
    lab = classify_positions(n) if labels is None else torch.as_tensor(labels).reshape(-1)
    if lab.numel() != n:
        raise ValueError(f"token labels cover {lab.numel()} tokens, the embedding has {n}")
    lab = lab.to(x.device)
    xf = x.to(torch.float32)
    y = torch.addcmul(shift.to(x.device, torch.float32)[lab], xf, scale.to(x.device, torch.float32)[lab])
    p = 0 if prefix is None else prefix.shape[0]
    if p and n > p and int(lab[0]) == int(TokenClass.SINK) and bool((lab[1:p] == int(TokenClass.TEMPLATE)).all()):
        y[..., :p, :] = prefix.to(x.device, torch.float32)
    return y.to(x.dtype) if y.dtype != x.dtype else y
