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

__all__ = ["LayerIndexError", "normalize_hf_layer", "hf_to_comfy_layer", "comfy_to_hf_layer", "hf_layer_range"]


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
