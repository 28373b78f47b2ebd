"""Placeholder: replaced by the real node."""

from comfy_api.latest import io

from .common import CATEGORY


class DimensionAnalyzer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="DimFixDimensionAnalyzer", display_name="Dimension Analyzer", category=CATEGORY,
                         description="Not implemented yet.", inputs=[], outputs=[])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        raise NotImplementedError("Dimension Analyzer is not implemented yet")
