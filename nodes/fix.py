"""Placeholder: replaced by the real node."""

from comfy_api.latest import io

from .common import CATEGORY


class EmbeddingDimensionFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="DimFixEmbeddingDimensionFix", display_name="Embedding Dimension Fix", category=CATEGORY,
                         description="Not implemented yet.", inputs=[], outputs=[])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        raise NotImplementedError("Embedding Dimension Fix is not implemented yet")
