"""Import-only stand-ins for packages ComfyUI imports at module level but this pack never uses.

PyPI has no CPU build of torchvision / torchaudio for every torch release, and ComfyUI imports them at
module level for models this pack never touches (SAM 3's ``torchvision.ops.roi_align``, the LTX audio VAE's
``torchaudio``, Stable Cascade, Cosmos, ACE). A stand-in makes every submodule and every name importable
(``from torchvision.ops import roi_align``, ``torchvision.transforms.InterpolationMode.BILINEAR`` and
subclassing work at import time); calling or instantiating a stood-in name raises, so nothing can silently
depend on it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class StandInUsed(RuntimeError):
    """A stood-in object was used, not just imported."""


def _fail(path: str):
    raise StandInUsed(f"{path} is an import-only stand-in (the real package does not import with this torch); "
                      "nothing this test environment runs may use it")


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls._path}.{name}")

    def __call__(cls, *args, **kwargs):
        _fail(cls._path)


def _placeholder(path: str) -> type:
    # A class, so module-level code may subclass or annotate with it; using it raises.
    return _Meta(path.rsplit(".", 1)[-1], (), {"_path": path, "__module__": path.rsplit(".", 1)[0]})


def _fill(module: types.ModuleType) -> None:
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{module.__name__}.{name}")
        setattr(module, name, value)
        return value

    module.__getattr__ = __getattr__
    module.__version__ = "0.0.0+standin"


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []
        _fill(module)


def stand_in(package: types.ModuleType) -> None:
    """Make ``package`` (an ``__init__`` module) an import-only stand-in with importable submodules."""
    _fill(package)
    if not any(isinstance(f, _Finder) and f.root == package.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(package.__name__))
