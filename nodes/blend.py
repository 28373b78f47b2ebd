"""Placeholder: replaced by the real node."""

from comfy_api.latest import io

from .common import CATEGORY


class EmbeddingBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="DimFixEmbeddingBlend", display_name="Embedding Blend", category=CATEGORY,
                         description="Not implemented yet.", inputs=[], outputs=[])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        raise NotImplementedError("Embedding Blend is not implemented yet")
