"""Test-suite bootstrap.

The core package is registered as the top-level module ``dimfix`` straight from its folder, so the
repository root never goes on ``sys.path`` (it holds a ``nodes/`` package, and ComfyUI has a
top-level ``nodes`` module of its own). ``tests/`` goes on ``sys.path`` for the shared test kit.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SHARED_DATA = ROOT.parent / "shared" / "data"


def _register_core() -> None:
    if "dimfix" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "dimfix", ROOT / "dimfix" / "__init__.py", submodule_search_locations=[str(ROOT / "dimfix")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dimfix"] = module
    spec.loader.exec_module(module)


_register_core()
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def reference_stats_npz() -> Path:
    """Real Qwen3-4B layer -2 per-dim stats shipped beside the project (skips when absent)."""
    path = SHARED_DATA / "qwen3_4b_layer-2_reference_stats.npz"
    if not path.is_file():
        pytest.skip(f"reference stats not found at {path} (only present beside the development checkout)")
    return path

