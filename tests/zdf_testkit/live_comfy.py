"""Host-tier helpers around an in-process ComfyUI: core extra nodes, pack node registration, spec refresh."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
PACK_MODULE = "custom_nodes_x_zimage_dimfix"
PACK_FOLDER = "zimage-dimfix"
#: What a user's clone of the pack holds that ComfyUI reads (code, workflows, tables, web files, locales).
PACK_FILES = ("__init__.py", "pyproject.toml", "requirements.txt", "nodes", "dimfix", "fix_tables", "workflows",
              "web", "locales")
_EXTRAS_LOADED: list[bool] = []


def install_pack(custom_nodes: Path, name: str = PACK_FOLDER) -> Path:
    """Copy the pack as a user would have it into ``custom_nodes/name`` (no caches); returns the folder."""
    import shutil

    pack = Path(custom_nodes) / name
    pack.mkdir(parents=True)
    for item in PACK_FILES:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, pack / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copyfile(src, pack / item)
    return pack


def ensure_extra_nodes(nodes) -> None:
    """Load ComfyUI's ``comfy_extras`` nodes (V3 primitives, EmptySD3LatentImage, PreviewAny, …) once."""
    if _EXTRAS_LOADED:
        return
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _EXTRAS_LOADED.append(True)


@contextlib.contextmanager
def pack_nodes_registered(nodes, node_list) -> Iterator[None]:
    """Register the pack's V3 node classes in ``nodes.NODE_CLASS_MAPPINGS`` as ``load_custom_node`` does
    (id → class, ``RELATIVE_PYTHON_MODULE``), and remove them again afterwards."""
    added = []
    missing = object()
    for cls in node_list:
        schema = cls.GET_SCHEMA()
        if schema.node_id not in nodes.NODE_CLASS_MAPPINGS:
            added.append((schema.node_id, cls, cls.__dict__.get("RELATIVE_PYTHON_MODULE", missing)))
            nodes.NODE_CLASS_MAPPINGS[schema.node_id] = cls
            cls.RELATIVE_PYTHON_MODULE = "custom_nodes.zimage-dimfix"
    try:
        yield
    finally:
        for node_id, cls, previous in added:
            nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)
            if previous is missing:
                del cls.RELATIVE_PYTHON_MODULE
            else:
                cls.RELATIVE_PYTHON_MODULE = previous


def import_comfy_standalone():
    """Import ComfyUI from ``COMFYUI_PATH`` on the CPU (for scripts; tests use the ``comfy`` fixture)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI 0.8 checkout")
    if path not in sys.path:
        sys.path.insert(0, str(Path(path).resolve()))
    from .host_env import ensure_standins

    ensure_standins()
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401
    import nodes

    return nodes


def load_pack_nodes() -> list:
    """The pack's node classes, imported the way ComfyUI imports a custom-node folder."""
    if PACK_MODULE in sys.modules:
        module = sys.modules[PACK_MODULE]
    else:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    extension = asyncio.run(module.comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


def current_specs(nodes, node_list, class_types) -> dict:
    """Specs of ``class_types`` from the live ComfyUI plus the pack."""
    from .workflow_specs import live_specs

    ensure_extra_nodes(nodes)
    mapping = {**nodes.NODE_CLASS_MAPPINGS, **{c.GET_SCHEMA().node_id: c for c in node_list}}
    return live_specs(mapping, class_types)


def comfyui_version() -> str:
    path = Path(os.environ.get("COMFYUI_PATH", "")) / "comfyui_version.py"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return ""


def host_version() -> tuple[int, ...]:
    """:func:`comfyui_version` as a tuple of ints, e.g. ``(0, 33, 0)``; ``()`` when unknown."""
    return tuple(int(p) for p in comfyui_version().split(".") if p.isdigit())


def refresh_specs() -> None:
    """Rewrite ``workflow_node_specs.json`` from the live ComfyUI (``COMFYUI_PATH``) and the pack."""
    from .build_workflows import USED_TYPES
    from .workflow_specs import write_specs

    nodes = import_comfy_standalone()
    specs = current_specs(nodes, load_pack_nodes(), USED_TYPES)
    write_specs(specs, comfyui_version=comfyui_version())
