"""Shared helper for the benchmark scripts (``python tests/bench/bench_*.py``).

``load_core()`` registers the core package as the top-level module ``dimfix`` straight from its
folder — the repository root never goes on ``sys.path`` (its ``nodes/`` would shadow ComfyUI's).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]


def load_core() -> ModuleType:
    """Register (once) and return the ``dimfix`` core package."""
    module = sys.modules.get("dimfix")
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(
        "dimfix", ROOT / "dimfix" / "__init__.py", submodule_search_locations=[str(ROOT / "dimfix")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dimfix"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["dimfix"]
        raise
    return module


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Smallest wall time (seconds) of ``repeat`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
