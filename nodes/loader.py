"""Qwen3 Embedding Loader: any Qwen3 checkpoint (file or HF folder, sharded, flat keys) -> native CLIP."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

import comfy.sd
import comfy.utils
import folder_paths
from comfy.text_encoders import z_image
from comfy_api.latest import io

from ..dimfix.checkpoint import (CheckpointError, Qwen3Checkpoint, fingerprint_path, list_model_entries,
                                 read_qwen3_checkpoint, resolve_entry)
from ..dimfix.conditioning import LAYER_KEY, MODEL_KEY
from ..dimfix.layers import comfy_to_hf_layer
from ..dimfix.tokens import ZIMAGE_WIDTH
from .common import CATEGORY

log = logging.getLogger(__name__)

NODE = "Qwen3 Embedding Loader"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp32": torch.float32}
#: ``SDTokenizer`` option (``{embedding_key}_min_padding``): pad tokens appended after the template.
APPEND_OPTION = "qwen3_4b_min_padding"


class Qwen3AllTokensModel(z_image.Qwen3_4BModel):
    """ComfyUI's Qwen3 text-encoder wrapper with every token attended (attention mask all ones).

    The stock wrapper treats the first ``<|endoftext|>`` (151643, its pad id) as the end of the sequence and
    gives it and every later token mask 0. Z-Image must never receive mask zeros, and an appended
    ``<|endoftext|>`` (Qwen3-Embedding's own tokenizer adds one) must be attended like any other token.
    Installed through the public ``model_options["qwen3_4b_class"]`` hook. Its outputs also record their
    source in the CONDITIONING (``dimfix_model`` = ``dimfix_model_name``, ``dimfix_layer`` = the HF index of
    the selected layer), which Embedding Dimension Fix checks against a fix table's metadata.
    """

    dimfix_model_name: str = ""

    def process_tokens(self, tokens, device):
        embeds, mask, num_tokens, info = super().process_tokens(tokens, device)
        ones = torch.ones_like(mask)
        return embeds, ones, [int(ones.shape[1])] * int(ones.shape[0]), info

    def forward(self, tokens):
        out = super().forward(tokens)
        if len(out) > 2 and self.layer == "hidden":  # one layer (not the analyzer's "all" / list requests)
            extra = dict(out[2])
            if self.dimfix_model_name:
                extra[MODEL_KEY] = self.dimfix_model_name
            hf = comfy_to_hf_layer(int(self.layer_idx), int(self.num_layers))
            if hf is not None:
                extra[LAYER_KEY] = hf - int(self.num_layers) - 1
            out = (*out[:2], extra)
        return out


def text_encoder_dirs() -> list[str]:
    return list(folder_paths.get_folder_paths("text_encoders"))


def build_clip(ckpt: Qwen3Checkpoint, dtype: torch.dtype | None = None, append_eos: bool = False):
    """A native ComfyUI CLIP (Z-Image tokenizer and text-encoder wrapper) from a checkpoint in ComfyUI layout."""
    sd = dict(ckpt.state_dict)  # new mapping, same tensors
    target = dtype or ckpt.info.dtype
    norm = sd["model.norm.weight"]
    if norm.dtype != target:
        # ComfyUI takes the text encoder's weight dtype from this tensor (llama_detect); casting this one
        # vector selects the dtype, and load_state_dict casts every other weight while copying it in.
        sd["model.norm.weight"] = norm.to(target)
    model_options = {"qwen3_4b_class": Qwen3AllTokensModel}  # fresh dict per call (ComfyUI may mutate it)
    overrides = ckpt.comfy_overrides()
    if overrides:
        model_options["qwen3_4b_model_config"] = dict(overrides)
    embeddings = folder_paths.get_folder_paths("embeddings")
    if comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.QWEN3_4B:
        clip = comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.LUMINA2,
                                                      embedding_directory=embeddings, model_options=model_options)
    else:
        # ComfyUI detects Qwen3-4B only at width 2560; other widths get the same Z-Image classes directly.
        spec = SimpleNamespace(params={}, clip=z_image.te(dtype_llama=target), tokenizer=z_image.ZImageTokenizer)
        clip = comfy.sd.CLIP(spec, embedding_directory=embeddings, state_dict=[sd],
                             parameters=comfy.utils.calculate_parameters(sd), model_options=model_options)
    if append_eos:
        clip.set_tokenizer_option(APPEND_OPTION, 1)
    return clip


class Qwen3EmbeddingLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DimFixQwen3EmbeddingLoader",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "Loads any Qwen3 text encoder as a Z-Image CLIP: Qwen3-4B, Qwen3-Embedding-4B, fine-tunes. Accepts a "
                "single .safetensors file or a Hugging Face folder (config.json + model.safetensors or shards with "
                "an index), with or without the 'model.' key prefix; vocabulary size and depth are read from the "
                "weights. Works with the stock CLIP Text Encode. Pickle files (.bin/.pt) are refused."),
            inputs=[
                io.Combo.Input("model_name", options=list_model_entries(text_encoder_dirs()),
                               tooltip="A .safetensors file or a Hugging Face model folder in models/text_encoders."),
                io.Combo.Input("dtype", options=list(DTYPES), default="default",
                               tooltip="Weight dtype: 'default' keeps the stored dtype (an fp16 file loads as "
                                       "bf16), 'bf16' halves the memory of an fp32 file, 'fp32' for exact analysis. "
                                       "No fp16: Qwen3's massive activations (~1.35e4) overflow fp16's range "
                                       "(65504) in RMSNorm's squared sums."),
                io.Boolean.Input("append_eos", default=False,
                                 tooltip="Append <|endoftext|> after the chat template, as Qwen3-Embedding's own "
                                         "tokenizer does (one extra token, attended). Off for Z-Image's reference "
                                         "behaviour."),
            ],
            outputs=[io.Clip.Output(tooltip="A native ComfyUI CLIP: Z-Image chat template, HF hidden layer -2.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str, dtype: str = "default", append_eos: bool = False) -> str:
        try:
            fp = fingerprint_path(resolve_entry(text_encoder_dirs(), model_name))
        except CheckpointError as e:
            fp = f"unreadable: {e}"
        return f"{fp}|{dtype}|{bool(append_eos)}"

    @classmethod
    def execute(cls, model_name: str, dtype: str = "default", append_eos: bool = False) -> io.NodeOutput:
        if dtype not in DTYPES:
            raise ValueError(f"{NODE}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        import comfy.model_management

        bar = {}

        def on_file(done: int, total: int) -> None:  # progress per weight file; Interrupt between files
            comfy.model_management.throw_exception_if_processing_interrupted()
            if "pbar" not in bar:
                bar["pbar"] = comfy.utils.ProgressBar(total)
            bar["pbar"].update_absolute(done, total)

        try:
            ckpt = read_qwen3_checkpoint(resolve_entry(text_encoder_dirs(), model_name), on_file=on_file)
        except CheckpointError as e:
            raise ValueError(f"{NODE}: {e}") from None
        info = ckpt.info
        if info.hidden != ZIMAGE_WIDTH:
            log.warning("%s: %s has width %d; Z-Image needs %d. Loaded for analysis only: its conditioning will not "
                        "fit Z-Image.", NODE, model_name, info.hidden, ZIMAGE_WIDTH)
        want = DTYPES[dtype]
        if want is None and info.dtype == torch.float16:
            want = torch.bfloat16
            log.warning("%s: %s is stored in fp16; loading it as bf16 (Qwen3's massive activations overflow fp16). "
                        "Choose fp32 for exact analysis.", NODE, model_name)
        clip = build_clip(ckpt, want, bool(append_eos))
        # shared by every clone of this CLIP: names the encoder in conditionings and fix tables
        clip.cond_stage_model.qwen3_4b.dimfix_model_name = f"{model_name}@{ckpt.fingerprint}"
        log.info("%s: %s (%d layers, width %d, vocab %d, %s, fingerprint %s)%s", NODE, model_name, info.layers,
                 info.hidden, info.vocab, str(want or info.dtype).replace("torch.", ""), ckpt.fingerprint,
                 f", config overrides {ckpt.comfy_overrides()}" if ckpt.comfy_overrides() else "")
        return io.NodeOutput(clip)
