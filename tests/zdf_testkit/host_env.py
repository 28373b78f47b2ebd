"""Environment helpers for running a real ComfyUI in the host tier."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

STANDINS = Path(__file__).resolve().parent / "standins"
#: Packages ComfyUI imports at module level that have no CPU build for every torch on PyPI.
STOOD_IN = ("torchvision", "torchaudio")


def _standin_dir(package: str) -> str:
    return str(STANDINS / package)


def importable(package: str) -> bool:
    """True when a working ``package`` imports in this interpreter (a failed attempt is undone)."""
    if _standin_dir(package) in sys.path:
        return False
    try:
        importlib.import_module(package)
        return True
    except (ImportError, OSError, RuntimeError):
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
        return False


def standin_paths() -> list[str]:
    """sys.path entries that stand in for every package of :data:`STOOD_IN` that does not import here."""
    missing = [p for p in STOOD_IN if not importable(p)]
    return [str(STANDINS / "common"), *map(_standin_dir, missing)] if missing else []


def ensure_standins() -> list[str]:
    """Put the stand-ins on sys.path where needed; returns the packages now stood in."""
    paths = standin_paths()
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0, p)
    return [Path(p).name for p in paths[1:]]


def server_env(base: dict | None = None) -> dict:
    """Environment for a ComfyUI server subprocess, with the stand-ins this process needs."""
    env = dict(os.environ if base is None else base)
    paths = standin_paths()
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, env.get("PYTHONPATH", "")) if p)
    return env
