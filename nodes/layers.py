"""Placeholder: replaced by the real node."""

from comfy_api.latest import io

from .common import CATEGORY


class HiddenLayerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="DimFixHiddenLayerSelect", display_name="Hidden Layer Select", category=CATEGORY,
                         description="Not implemented yet.", inputs=[], outputs=[])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        raise NotImplementedError("Hidden Layer Select is not implemented yet")
