"""Hidden Layer Select: choose the Qwen3 hidden layer a CLIP returns, in Hugging Face indexing."""

from __future__ import annotations

from comfy_api.latest import io

from ..dimfix.layers import LayerIndexError, hf_to_comfy_layer
from .common import CATEGORY

NODE = "Hidden Layer Select"
QWEN3_TE = "qwen3_4b"


def qwen3_depth(clip) -> int:
    """Number of transformer blocks of a Z-Image (Qwen3) CLIP, read from the loaded model."""
    model = getattr(clip, "cond_stage_model", None)
    inner = getattr(model, QWEN3_TE, None) if model is not None else None
    depth = getattr(inner, "num_layers", None)
    if depth is None:
        raise ValueError(f"{NODE}: input 'clip' must be a Z-Image (Qwen3) text encoder, got "
                         f"{type(model).__name__ if model is not None else type(clip).__name__}")
    return int(depth)


class HiddenLayerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DimFixHiddenLayerSelect",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "Makes a Qwen3 CLIP return another hidden layer, counted like Hugging Face hidden_states "
                "(unlike CLIP Set Last Layer, whose -1 is the pre-norm last block). Returns a copy; the input CLIP "
                "is unchanged."),
            inputs=[
                io.Clip.Input("clip",
                              tooltip="A Z-Image (Qwen3) CLIP, e.g. from Qwen3 Embedding Loader or CLIPLoader."),
                io.Int.Input("layer", default=-2, min=-1024, max=1024,
                             tooltip="Hugging Face hidden_states index: -2 is Z-Image's training layer, -6 the origin "
                                     "research's recommendation for VL encoders; 1..N-1 count blocks from the input. "
                                     "0 (embeddings) and N / -1 (final-normed output) cannot be returned by a CLIP."),
            ],
            outputs=[io.Clip.Output(tooltip="A copy of the CLIP that encodes with the chosen hidden layer.")],
        )

    @classmethod
    def execute(cls, clip, layer: int = -2) -> io.NodeOutput:
        depth = qwen3_depth(clip)
        try:
            index = hf_to_comfy_layer(int(layer), depth)
        except LayerIndexError as e:
            raise ValueError(f"{NODE}: {e}") from None
        out = clip.clone()
        out.clip_layer(index)
        return io.NodeOutput(out)
