"""Qwen3 Embedding Loader: any Qwen3 checkpoint (file or HF folder, sharded, flat keys) -> native CLIP."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..dimfix.checkpoint import CheckpointError, fingerprint_path, list_model_entries, read_qwen3_checkpoint, \
    resolve_entry
from ..dimfix.tokens import ZIMAGE_WIDTH
from . import comfy_access as host
from .common import CATEGORY

log = logging.getLogger(__name__)

NODE = "Qwen3 Embedding Loader"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def _target_dtype(dtype: str, stored: torch.dtype, model_name: str) -> torch.dtype:
    want = DTYPES[dtype] or stored
    if want == torch.float16:
        log.warning("%s: %s is stored in fp16; loading it as bf16 (Qwen3's massive activations overflow fp16). "
                    "Choose fp32 for exact analysis.", NODE, model_name)
        want = torch.bfloat16
    return want


class Qwen3EmbeddingLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return host.schema(
            node_id="DimFixQwen3EmbeddingLoader",
            display_name=NODE,
            category=CATEGORY,
            search_aliases=["qwen3 embedding", "text encoder swap", "dimfix", "load qwen3", "hf folder"],
            description="Loads any Qwen3 text encoder (Qwen3-4B, Qwen3-Embedding-4B, fine-tunes; a .safetensors "
                        "file or a Hugging Face folder) as a Z-Image CLIP for the stock CLIP Text Encode.",
            inputs=[
                io.Combo.Input("model_name", options=list_model_entries(host.text_encoder_dirs()),
                               tooltip="A .safetensors file or a Hugging Face model folder in models/text_encoders."),
                io.Combo.Input("dtype", options=list(DTYPES), default="default",
                               tooltip="default keeps the stored dtype (fp16 loads as bf16); fp32 for exact "
                                       "analysis. Never fp16: Qwen3's massive activations overflow it."),
                io.Boolean.Input("append_eos", default=False,
                                 tooltip="Append <|endoftext|> after the template, as Qwen3-Embedding's tokenizer "
                                         "does. Off reproduces Z-Image's encoding."),
                io.Boolean.Input("analysis_only", default=False,
                                 tooltip="Allow a width other than Z-Image's 2560: for the Dimension Analyzer only, "
                                         "its conditioning cannot drive Z-Image."),
            ],
            outputs=[io.Clip.Output(tooltip="A native ComfyUI CLIP: Z-Image chat template, HF hidden layer -2.")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        """Replaces the generic "value not in list" check with what to download and where."""
        dirs = host.text_encoder_dirs()
        if model_name in list_model_entries(dirs):
            return True
        return (f"{NODE}: {model_name!r} is not in models/text_encoders ({', '.join(dirs)}). Put the model there: a "
                ".safetensors file, or the whole Hugging Face folder (config.json, model*.safetensors and the index), "
                "e.g. huggingface-cli download Qwen/Qwen3-Embedding-4B --local-dir "
                "models/text_encoders/Qwen3-Embedding-4B; then press R to refresh and pick it")

    @classmethod
    def fingerprint_inputs(cls, model_name: str, dtype: str = "default", append_eos: bool = False,
                           analysis_only: bool = False) -> str:
        try:
            fp = fingerprint_path(resolve_entry(host.text_encoder_dirs(), model_name))
        except CheckpointError as e:
            fp = f"unreadable: {e}"
        return f"{fp}|{dtype}|{bool(append_eos)}|{bool(analysis_only)}"

    @classmethod
    def execute(cls, model_name: str, dtype: str = "default", append_eos: bool = False,
                analysis_only: bool = False) -> io.NodeOutput:
        if dtype not in DTYPES:
            raise ValueError(f"{NODE}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        bar = []

        def on_file(done: int, total: int) -> None:  # progress per weight file; Interrupt between files
            host.check_interrupt()
            if not bar:
                bar.append(host.progress(total))
            bar[0].update_absolute(done, total)

        try:
            path = resolve_entry(host.text_encoder_dirs(), model_name)
            ckpt = read_qwen3_checkpoint(path, on_file=on_file)
        except CheckpointError as e:
            raise ValueError(f"{NODE}: model_name {model_name!r}: {e}") from None
        info = ckpt.info
        if info.hidden != ZIMAGE_WIDTH and not analysis_only:
            raise ValueError(f"{NODE}: {model_name} has width {info.hidden}, but Z-Image reads {ZIMAGE_WIDTH}-wide "
                             "conditioning: choose a Qwen3-4B-sized encoder, or set analysis_only to load it for the "
                             "Dimension Analyzer only")
        want = _target_dtype(dtype, info.dtype, model_name)
        clip = host.load_clip(path, ckpt, want, bool(append_eos), f"{model_name}@{ckpt.fingerprint}")
        log.info("%s: %s (%d layers, width %d, vocab %d, %s, fingerprint %s)%s", NODE, model_name, info.layers,
                 info.hidden, info.vocab, str(want).replace("torch.", ""), ckpt.fingerprint,
                 f", config overrides {ckpt.comfy_overrides()}" if ckpt.comfy_overrides() else "")
        return io.NodeOutput(clip)
