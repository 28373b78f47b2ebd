"""Placeholder: replaced by the real node."""

from comfy_api.latest import io

from .common import CATEGORY


class Qwen3EmbeddingLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="DimFixQwen3EmbeddingLoader", display_name="Qwen3 Embedding Loader", category=CATEGORY,
                         description="Not implemented yet.", inputs=[], outputs=[])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        raise NotImplementedError("Qwen3 Embedding Loader is not implemented yet")
