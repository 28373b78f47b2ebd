"""Hidden-layer index arithmetic between Hugging Face ``hidden_states`` and ComfyUI ``clip_layer``.

For a model with ``depth`` = N transformer blocks, HF ``output_hidden_states`` has N + 1 entries:
``[0]`` the embeddings, ``[k]`` (1 ≤ k ≤ N−1) the residual stream after block k, ``[N]`` the
final-normed output. Negative HF indices count from the end (``k + N + 1``); Z-Image uses ``[-2]``.

ComfyUI's ``CLIP.clip_layer(i)`` (the stock ``CLIPSetLastLayer``) on a Qwen3 text encoder (VERIFIED on
ComfyUI 0.8.0):

- ``0 ≤ i ≤ N−2`` → HF ``[i + 1]``; ``−N ≤ i ≤ −2`` → HF ``[i]`` (= ``[N + 1 + i]``);
- ``i = −1`` or ``N−1`` → the last block's output *before* the final norm (not an HF entry);
- ``i = N`` crashes inside ComfyUI; ``|i| > N`` is silently ignored (the default −2 is used).

So HF ``[0]`` (embeddings) and ``[N]`` (final norm) cannot be selected with ``clip_layer``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerIndexError", "LayerPlan", "normalize_hf_layer", "hf_to_comfy_layer", "comfy_to_hf_layer",
           "hf_layer_range", "plan_analysis_layers"]


class LayerIndexError(ValueError):
    """An HF hidden-state index that cannot be selected on a ComfyUI CLIP."""


def _check_depth(depth: int) -> None:
    if int(depth) != depth or depth < 2:
        raise LayerIndexError(f"model depth must be an integer ≥ 2, got {depth!r}")


def normalize_hf_layer(k: int, depth: int) -> int:
    """HF index ``k`` (negative counts from the end) as a position in ``[0, depth]``."""
    _check_depth(depth)
    if not -(depth + 1) <= k <= depth:
        raise LayerIndexError(
            f"hidden layer {k} is out of range for a {depth}-layer model: HF hidden_states has indices "
            f"0..{depth} (or {-(depth + 1)}..-1)")
    return k + depth + 1 if k < 0 else k


def hf_layer_range(depth: int) -> tuple[int, int, int, int]:
    """Selectable HF indices on a CLIP: ``(1, depth − 1, −depth, −2)`` — positive and negative ranges."""
    _check_depth(depth)
    return 1, depth - 1, -depth, -2


def hf_to_comfy_layer(k: int, depth: int) -> int:
    """The ``clip_layer`` argument that yields HF ``hidden_states[k]`` (always the negative form).

    Raises ``LayerIndexError`` (with the valid range) for out-of-range indices and for HF ``0``
    (embeddings) / ``depth`` (final-normed output), which ``clip_layer`` cannot reach.
    """
    lo, hi, nlo, nhi = hf_layer_range(depth)
    valid = f"valid: {lo}..{hi} or {nlo}..{nhi} for this {depth}-layer model"
    try:
        pos = normalize_hf_layer(k, depth)
    except LayerIndexError as e:
        raise LayerIndexError(f"{e}; {valid}") from None
    if pos == 0:
        raise LayerIndexError(f"hidden layer {k} is the embedding output, which a CLIP cannot return; {valid}")
    if pos == depth:
        raise LayerIndexError(
            f"hidden layer {k} is the final-normed output, which a CLIP cannot return (ComfyUI's layer -1 is the "
            f"last block before the final norm); {valid}")
    return pos - depth - 1


def comfy_to_hf_layer(i: int, depth: int) -> int | None:
    """The HF index (``0..depth``) that ``clip_layer(i)`` produces, or ``None`` for the pre-norm last block.

    ``|i| > depth`` is ignored by ComfyUI, which then uses its default −2 (HF ``depth − 1``).
    ``i == depth`` crashes inside ComfyUI and raises ``LayerIndexError`` here.
    """
    _check_depth(depth)
    if abs(i) > depth:
        return depth - 1
    if i == depth:
        raise LayerIndexError(f"clip_layer({i}) crashes ComfyUI for a {depth}-layer model")
    if i == -1 or i == depth - 1:
        return None
    return i + 1 if i >= 0 else depth + 1 + i


@dataclass(frozen=True)
class LayerPlan:
    """Which hidden states an analysis requests from each encoder, and how it pairs them.

    ``labels``: the target's HF indices (negative) the analysis reports; ``primary``: the report layer;
    ``reference_layer``: the one reference layer every target layer is paired with, or None when layer
    ``k`` is paired with layer ``k``; ``select_reference`` / ``select_target``: what to ask each encoder
    for in one forward -- ``"all"`` or a list of non-negative HF positions.
    """

    labels: list[int]
    primary: int
    reference_layer: int | None
    select_reference: list[int] | str
    select_target: list[int] | str


def _negative(k: int, n_states: int, name: str, which: str) -> int:
    """:func:`normalize_hf_layer` in negative form, with an error naming the widget and the encoder."""
    try:
        if isinstance(k, bool) or int(k) != k:
            raise LayerIndexError(f"not an integer: {k!r}")
        return normalize_hf_layer(int(k), n_states - 1) - n_states
    except LayerIndexError:
        raise LayerIndexError(f"{name} {k} is out of range for '{which}', which has {n_states} HF hidden states "
                              f"(valid: {-n_states} .. {n_states - 1}; -2 is the Z-Image default)") from None


def plan_analysis_layers(layer: int, reference_layer: int, target_states: int, reference_states: int,
                         sweep: bool = False) -> LayerPlan:
    """Pair the target's ``layer`` with the reference's ``reference_layer`` (HF indices, either sign; the
    encoders have ``*_states`` = blocks + 1 hidden states).

    The same layer on both sides pairs layer ``k`` with layer ``k`` (a sweep then measures both encoders
    at every layer, which needs equal depths). Otherwise the reference is measured at ``reference_layer``
    only and every analysed target layer is paired with it (a VL target at -6 against Qwen3-4B at -2).
    """
    k_tgt = _negative(layer, target_states, "layer", "target")
    k_ref = _negative(reference_layer, reference_states, "reference_layer", "reference")
    paired = k_ref == k_tgt and (target_states == reference_states or not sweep)
    if sweep:
        return LayerPlan(labels=list(range(-target_states, 0)), primary=k_tgt,
                         reference_layer=None if paired else k_ref,
                         select_reference="all" if paired else [k_ref + reference_states], select_target="all")
    return LayerPlan(labels=[k_tgt], primary=k_tgt, reference_layer=None if paired else k_ref,
                     select_reference=[k_ref + reference_states], select_target=[k_tgt + target_states])
