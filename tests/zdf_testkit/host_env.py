"""Environment helpers for running a real ComfyUI in the host tier."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

SHIMS = Path(__file__).resolve().parent / "shims"


def torchvision_importable() -> bool:
    """True when a working torchvision can be imported in this interpreter."""
    try:
        importlib.import_module("torchvision")
        return True
    except (ImportError, OSError, RuntimeError):
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def ensure_torchvision_importable() -> bool:
    """Put the import-only torchvision stand-in on sys.path when no working torchvision exists.

    Returns True when the stand-in is in use.
    """
    if torchvision_importable():
        return False
    if str(SHIMS) not in sys.path:
        sys.path.insert(0, str(SHIMS))
    return True


def server_env(base: dict | None = None) -> dict:
    """Environment for a ComfyUI server subprocess, adding the stand-in when needed."""
    env = dict(os.environ if base is None else base)
    # The stand-in may already be on this process's sys.path (then torchvision imports here but not there).
    if str(SHIMS) in sys.path or not torchvision_importable():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIMS), env.get("PYTHONPATH", "")) if p)
    return env
