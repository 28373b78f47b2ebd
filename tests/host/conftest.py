"""Host tier: tests that run the pack inside a real ComfyUI checkout.

Set ``COMFYUI_PATH`` to a ComfyUI source tree (0.8.0 or newer) whose requirements are installed in the
running interpreter (``tests/host/setup_host.sh TREE VENV`` makes such a virtualenv). Without it the run stops
with that message: a host test is never reported as skipped.
ComfyUI is imported in-process on the CPU; the pack is loaded the way ComfyUI loads custom
nodes (from its ``__init__.py`` under a path-derived module name).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
MISSING = ("the host tier needs a ComfyUI checkout: set COMFYUI_PATH to one (e.g. ../shared/hosts/comfyui-0.33.0) and "
           "run with a virtualenv made by tests/host/setup_host.sh (see README, Development)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    hosted = [item for item in items if here in Path(str(item.fspath)).resolve().parents]
    for item in hosted:
        item.add_marker(pytest.mark.host)
    if hosted and not COMFYUI_PATH:
        raise pytest.UsageError(MISSING)


def pytest_report_header(config):
    if not COMFYUI_PATH:
        return None
    from zdf_testkit.live_comfy import comfyui_version

    return f"ComfyUI host: {comfyui_version() or 'unknown version'} at {COMFYUI_PATH}"


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """Import ComfyUI on the CPU with its model folders pointed at a temporary base directory."""
    path = str(Path(COMFYUI_PATH).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    from zdf_testkit.host_env import ensure_standins, importable

    # transformers caches (lru_cache) whether torchvision exists: ask before the stand-in is on sys.path,
    # so transformers models used as test references never try to use the stand-in.
    from transformers.utils import import_utils as transformers_import_utils

    if transformers_import_utils.is_torchvision_available() and not importable("torchvision"):
        pytest.exit("torchvision is installed but does not import with this torch (a build for another torch "
                    "release); uninstall it ('pip uninstall torchvision') so the host tier can use its import-only "
                    "stand-in, or install the torchvision build that matches torch", returncode=4)
    ensure_standins()
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (must come after args.cpu)
    import comfy.sd
    import comfy.utils
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_base")
    for name in ("text_encoders", "diffusion_models", "vae", "fix_tables", "embeddings"):
        (base / "models" / name).mkdir(parents=True, exist_ok=True)
    for name in ("output", "temp", "input"):
        (base / name).mkdir(parents=True, exist_ok=True)
    folder_paths.models_dir = str(base / "models")
    for name in ("text_encoders", "diffusion_models", "vae", "embeddings"):
        paths, exts = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = ([str(base / "models" / name)], exts)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.filename_list_cache.clear()
    import nodes

    return SimpleNamespace(base=base, models=base / "models", folder_paths=folder_paths, nodes=nodes,
                           sd=comfy.sd, utils=comfy.utils, mm=comfy.model_management)


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack imported as ComfyUI imports a custom-node folder, plus its node classes by id."""
    name = "custom_nodes_x_zimage_dimfix"
    if name in sys.modules:
        module = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    extension = asyncio.run(module.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    by_id = {n.define_schema().node_id: n for n in node_list}
    core = importlib.import_module(name + ".dimfix")
    return SimpleNamespace(module=module, nodes=by_id, node_list=node_list, core=core, name=name)
