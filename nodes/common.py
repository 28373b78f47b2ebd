"""Shared node constants, socket types and the fix-table choice both Fix and Blend offer."""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from ..dimfix.fixtable import FixTable, load_fix_table
from . import comfy_access as host

log = logging.getLogger(__name__)

CATEGORY = "Z-Image DimFix"
NO_FILE = "none"

#: A fix table (``dimfix.fixtable.FixTable``) travelling between nodes.
FixTableSocket = io.Custom("FIX_TABLE")


def table_file_input(tooltip: str) -> io.Combo.Input:
    return io.Combo.Input("table_file", options=[NO_FILE, *host.fix_table_files()], default=NO_FILE, tooltip=tooltip)


def resolve_table(fix_table: FixTable | None, table_file: str, node: str) -> FixTable:
    """The connected FIX_TABLE, else the chosen saved table; a clear error when neither is given."""
    if fix_table is not None:
        if not isinstance(fix_table, FixTable):
            raise ValueError(f"{node}: input 'fix_table' must be a fix table, got {type(fix_table).__name__}")
        if table_file != NO_FILE:
            log.info("%s: using the connected fix_table; table_file %r is ignored", node, table_file)
        return fix_table
    if table_file and table_file != NO_FILE:
        return load_fix_table(host.fix_table_path(table_file))
    raise ValueError(f"{node}: no fix table -- connect a FIX_TABLE (Dimension Analyzer) or choose a saved table in "
                     "'table_file' (files in models/fix_tables)")


def table_file_fingerprint(table_file: str) -> tuple:
    """Changes when the chosen table file changes on disk, so ComfyUI re-runs the node."""
    if not table_file or table_file == NO_FILE:
        return (table_file,)
    try:
        st = os.stat(host.fix_table_path(table_file))
    except OSError:
        return (table_file, None)
    return (table_file, st.st_mtime_ns, st.st_size)


def check_width(cond: list, table: FixTable, socket: str, node: str) -> None:
    for i, (t, _) in enumerate(cond):
        if t.shape[-1] != table.dim:
            raise ValueError(f"{node}: input '{socket}' entry {i} has width {t.shape[-1]} but the fix table "
                             f"({table.meta.target_model or 'target'} vs {table.meta.reference_model or 'reference'}) "
                             f"has width {table.dim}; use a table measured for this encoder")
