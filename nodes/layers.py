"""Hidden Layer Select: choose the Qwen3 hidden layer a CLIP returns, in Hugging Face indexing."""

from __future__ import annotations

from comfy_api.latest import io

from ..dimfix.layers import LayerIndexError, hf_to_comfy_layer
from . import comfy_access as host
from .common import CATEGORY

NODE = "Hidden Layer Select"


class HiddenLayerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return host.schema(
            node_id="DimFixHiddenLayerSelect",
            display_name=NODE,
            category=CATEGORY,
            search_aliases=["hidden layer", "clip layer", "dimfix", "qwen3 layer", "vl layer"],
            description="Returns a copy of a Qwen3 or Qwen3-VL CLIP that encodes with another hidden layer, counted "
                        "like Hugging Face hidden_states (-2 = Z-Image's layer).",
            inputs=[
                io.Clip.Input("clip", tooltip="A Qwen3 CLIP (Qwen3 Embedding Loader, Load CLIP) or a core Qwen3-VL "
                                              "CLIP (ComfyUI >= 0.26)."),
                io.Int.Input("layer", default=-2, min=-1024, max=1024,
                             tooltip="HF hidden_states index: -2 = Z-Image's layer, -6 for VL encoders; 0 and -1 "
                                     "are not selectable."),
            ],
            outputs=[io.Clip.Output(tooltip="A copy of the CLIP that encodes with the chosen hidden layer.")],
        )

    @classmethod
    def execute(cls, clip, layer: int = -2) -> io.NodeOutput:
        try:
            index = hf_to_comfy_layer(int(layer), host.depth(clip, "clip", NODE))
        except LayerIndexError as e:
            raise ValueError(f"{NODE}: {e}") from None
        return io.NodeOutput(host.with_layer(clip, index))
