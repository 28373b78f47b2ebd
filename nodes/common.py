"""Shared node constants and socket types."""

from comfy_api.latest import io

CATEGORY = "Z-Image DimFix"

#: A fix table (``dimfix.fixtable.FixTable``) travelling between nodes.
FixTableSocket = io.Custom("FIX_TABLE")
