"""Prompt corpora for calibration runs: one prompt per line.

Standard library only (``python -m dimfix.batch`` uses it outside ComfyUI).

Rules of :func:`parse_corpus`:

- one prompt per non-empty line, surrounding whitespace stripped;
- lines whose first non-blank character is ``#`` are comments;
- blank / whitespace-only lines are dropped;
- duplicates are dropped (the first occurrence is kept) and reported in ``notes``;
- a prompt containing Qwen special-token text (``<|endoftext|>``, ``<|im_start|>``, any ``<|...|>``,
  ``<think>``, ``<tool_call>`` ...) is rejected with a :class:`ValueError`: the tokenizer turns that
  text into special tokens, which shifts the token classes and (for ``<|endoftext|>``, the pad token)
  makes ComfyUI emit attention-mask zeros;
- an empty result raises :class:`ValueError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CorpusResult", "parse_corpus", "default_corpus_path", "load_default_corpus", "load_corpus"]

#: ``<|...|>`` tokens (endoftext, im_start, im_end, vision markers, fim, ...) and Qwen3's added
#: angle-bracket tokens.
_SPECIAL_RE = re.compile(
    r"<\|[^<>|\s]{1,40}\|>|</?(?:think|tool_call|tool_response)>",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class CorpusResult:
    """Parsed corpus: the unique prompts in file order, and human-readable notes (dropped duplicates)."""

    prompts: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def parse_corpus(text: str, source: str = "corpus") -> CorpusResult:
    """Parse one-prompt-per-line text (rules in the module docstring). ``source`` names it in messages."""
    if not isinstance(text, str):
        raise TypeError(f"{source}: expected the corpus as text (str), got {type(text).__name__}")
    prompts: list[str] = []
    seen: dict[str, int] = {}
    notes: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SPECIAL_RE.search(line)
        if match:
            raise ValueError(
                f"{source}, line {lineno}: prompt contains the special-token text {match.group(0)!r}; "
                "the tokenizer would turn it into a special token (shifting the token classes, and "
                "'<|endoftext|>' is the pad token, which gives attention-mask zeros in ComfyUI). "
                "Remove it: the Z-Image template is added automatically."
            )
        if line in seen:
            notes.append(f"{source}, line {lineno}: duplicate of line {seen[line]} dropped: {line[:60]!r}")
            continue
        seen[line] = lineno
        prompts.append(line)
    if not prompts:
        raise ValueError(
            f"{source}: the corpus is empty; expected one image prompt per line "
            "(blank lines and lines starting with '#' are ignored)"
        )
    return CorpusResult(prompts=prompts, notes=notes)


def default_corpus_path() -> Path:
    """Path of the shipped calibration corpus, ``fix_tables/calibration_prompts.txt`` in the pack."""
    return Path(__file__).resolve().parent.parent / "fix_tables" / "calibration_prompts.txt"


def load_corpus(path: str | Path) -> CorpusResult:
    """Read and parse a UTF-8 corpus file (a clear error names the file when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt corpus not found: {path} (expected a UTF-8 text file, one prompt per line)")
    return parse_corpus(path.read_text(encoding="utf-8"), source=str(path.name))


def load_default_corpus() -> CorpusResult:
    """The shipped calibration corpus, parsed."""
    return load_corpus(default_corpus_path())
