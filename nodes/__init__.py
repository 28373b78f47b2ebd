"""ComfyUI node classes (V3 schema). Thin translators between sockets and ``dimfix`` calls."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .analyzer import DimensionAnalyzer
from .blend import EmbeddingBlend
from .fix import EmbeddingDimensionFix
from .grid import ComparisonGrid
from .layers import HiddenLayerSelect
from .loader import Qwen3EmbeddingLoader

NODES: list[type[io.ComfyNode]] = [
    Qwen3EmbeddingLoader,
    HiddenLayerSelect,
    DimensionAnalyzer,
    EmbeddingDimensionFix,
    EmbeddingBlend,
    ComparisonGrid,
]


class DimFixExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
