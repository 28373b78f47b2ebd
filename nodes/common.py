"""Shared node constants, socket types and the fix_tables model folder."""

import os
from pathlib import Path

from comfy_api.latest import io

CATEGORY = "Z-Image DimFix"

#: A fix table (``dimfix.fixtable.FixTable``) travelling between nodes.
FixTableSocket = io.Custom("FIX_TABLE")

#: ComfyUI model-folder name of saved fix tables (``models/fix_tables`` plus the pack's ``fix_tables/``).
FIX_TABLES_FOLDER = "fix_tables"
PACK_FIX_TABLES_DIR = Path(__file__).resolve().parent.parent / "fix_tables"


def register_fix_tables_folder() -> None:
    """Register (idempotently) the ``fix_tables`` model folder, listing only ``.safetensors`` files.

    Keeps paths already configured (e.g. from ``extra_model_paths.yaml``) and appends
    ``<models_dir>/fix_tables`` and the pack's own ``fix_tables/`` folder.
    """
    import folder_paths

    paths, _ = folder_paths.folder_names_and_paths.get(FIX_TABLES_FOLDER, ([], set()))
    paths = list(paths)
    for p in (os.path.join(folder_paths.models_dir, FIX_TABLES_FOLDER), str(PACK_FIX_TABLES_DIR)):
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths[FIX_TABLES_FOLDER] = (paths, {".safetensors"})


def fix_table_files() -> list[str]:
    """Saved fix tables (names relative to the fix_tables folders); empty when none are found."""
    import folder_paths

    register_fix_tables_folder()
    if FIX_TABLES_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return sorted(folder_paths.get_filename_list(FIX_TABLES_FOLDER))


def fix_table_path(name: str) -> str:
    """Full path of a saved fix table listed by :func:`fix_table_files` (error names the folders searched)."""
    import folder_paths

    register_fix_tables_folder()
    path = folder_paths.get_full_path(FIX_TABLES_FOLDER, name)
    if path is None:
        folders = folder_paths.folder_names_and_paths[FIX_TABLES_FOLDER][0]
        raise FileNotFoundError(f"fix table {name!r} not found in the fix_tables folders: {', '.join(folders)}")
    return path
