"""The Z-Image chat template and per-token classes.

Z-Image Turbo is conditioned on every token of
``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` (no BOS, no padding).
Statistics and fixes treat tokens differently by class:

- ``SINK``: position 0. Qwen3 writes its massive activations (dims 4, 396, ...) there.
- ``TEMPLATE``: the chat-template and other special tokens around the prompt.
- ``CONTENT``: the prompt's own tokens.
- ``APPENDED_EOS``: a trailing ``<|endoftext|>`` appended by Qwen3-Embedding's tokenizer.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Sequence

import torch

ZIMAGE_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: Width of Z-Image's text conditioning: the Qwen3-4B hidden size.
ZIMAGE_WIDTH = 2560
#: Token scopes of statistics and fixes (see :func:`scope_mask`), the default first.
SCOPES = ("content", "no_sink", "all")

ENDOFTEXT = 151643
IM_START = 151644
IM_END = 151645
#: Token ids of the template around the prompt, for the Qwen2/Qwen3 tokenizer.
TEMPLATE_PREFIX_IDS = (IM_START, 872, 198)  # <|im_start|> user \n
TEMPLATE_SUFFIX_IDS = (IM_END, 198, IM_START, 77091, 198)  # <|im_end|> \n <|im_start|> assistant \n
#: The empty think block ComfyUI's Qwen3-VL tokenizer appends after the template: <think> \n\n </think> \n\n
THINK_BLOCK_IDS = (151667, 271, 151668, 271)
#: Ids at or above this value are special tokens in Qwen3's vocabulary.
FIRST_SPECIAL_ID = ENDOFTEXT


class TokenClass(IntEnum):
    SINK = 0
    TEMPLATE = 1
    CONTENT = 2
    APPENDED_EOS = 3


#: Token classes that fixes and statistics use by default ("content scope").
CONTENT_CLASSES = (TokenClass.CONTENT,)


def classify_ids(ids: Sequence[int]) -> torch.Tensor:
    """Class label (int64 [T]) for each token id of one templated sequence."""
    ids = [int(i) for i in ids]
    n = len(ids)
    labels = torch.full((n,), int(TokenClass.CONTENT), dtype=torch.int64)
    if n == 0:
        return labels
    for i, tok in enumerate(ids):
        if tok >= FIRST_SPECIAL_ID:
            labels[i] = int(TokenClass.TEMPLATE)
    p, s = len(TEMPLATE_PREFIX_IDS), len(TEMPLATE_SUFFIX_IDS)
    end = n
    if ids[-1] == ENDOFTEXT and n > 1:
        labels[-1] = int(TokenClass.APPENDED_EOS)
        end = n - 1
    t = len(THINK_BLOCK_IDS)
    if end >= t and tuple(ids[end - t:end]) == THINK_BLOCK_IDS:
        labels[end - t:end] = int(TokenClass.TEMPLATE)
        end -= t
    if tuple(ids[:p]) == TEMPLATE_PREFIX_IDS:
        labels[:p] = int(TokenClass.TEMPLATE)
    if end >= s and tuple(ids[end - s:end]) == TEMPLATE_SUFFIX_IDS:
        labels[end - s:end] = int(TokenClass.TEMPLATE)
    labels[0] = int(TokenClass.SINK)
    return labels


def classify_positions(n_tokens: int, prefix: int = len(TEMPLATE_PREFIX_IDS),
                       suffix: int = len(TEMPLATE_SUFFIX_IDS), appended_eos: bool = False) -> torch.Tensor:
    """Class labels when only the length is known (e.g. a CONDITIONING from elsewhere).

    Assumes the Z-Image template: ``prefix`` template tokens, the prompt, ``suffix`` template tokens
    and optionally one appended ``<|endoftext|>``. Too-short sequences are labelled sink + template.
    """
    labels = torch.full((n_tokens,), int(TokenClass.CONTENT), dtype=torch.int64)
    if n_tokens == 0:
        return labels
    end = n_tokens
    if appended_eos and n_tokens > 1:
        labels[-1] = int(TokenClass.APPENDED_EOS)
        end -= 1
    labels[: min(prefix, end)] = int(TokenClass.TEMPLATE)
    labels[max(end - suffix, 0):end] = int(TokenClass.TEMPLATE)
    labels[0] = int(TokenClass.SINK)
    return labels


def check_scope(token_scope: str) -> str:
    """``token_scope`` if it is one of :data:`SCOPES`, else a ValueError listing them."""
    if token_scope not in SCOPES:
        raise ValueError(f"token scope must be one of {', '.join(SCOPES)}; got {token_scope!r}")
    return token_scope


def scope_mask(labels: torch.Tensor, token_scope: str) -> torch.Tensor:
    """Boolean mask of the tokens a fix or statistic applies to.

    ``token_scope``: ``"all"`` (every token), ``"content"`` (prompt tokens only) or
    ``"no_sink"`` (everything except position 0 and an appended EOS).
    """
    if check_scope(token_scope) == "all":
        return torch.ones_like(labels, dtype=torch.bool)
    if token_scope == "content":
        return labels == int(TokenClass.CONTENT)
    return (labels != int(TokenClass.SINK)) & (labels != int(TokenClass.APPENDED_EOS))
