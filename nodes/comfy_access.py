"""The pack's one boundary with ComfyUI: every use of a ComfyUI internal lives here, with the differences
between host versions (0.8.0 … 0.33+) handled in this file only. Node files hold schemas and ``execute``.

Public paths are used where the host has them: ``CLIP.tokenize / clone / clip_layer / encode_from_tokens``,
``folder_paths``, ``comfy_api``, ``ProgressBar`` and the interrupt check. What still needs an internal, and why:

- building a CLIP from a remapped state dict: ``comfy.sd.load_text_encoder_state_dicts`` (what the stock
  loader calls once it has read a file; no public API takes a state dict) and, for widths ComfyUI does not
  detect, ``comfy.sd.CLIP`` with the Z-Image classes of ``comfy.text_encoders.z_image``;
- every token attended: a subclass of ``z_image.Qwen3_4BModel`` installed through the documented
  ``model_options["qwen3_4b_class"]`` hook;
- reloading for ``ModelPatcher.clone(disable_dynamic=True)`` (DynamicVRAM, 0.16+): ``cached_patcher_init``,
  set as core ``load_clip`` sets it;
- the text model inside a CLIP (``cond_stage_model.<name>``: depth, and on hosts before 0.12 several layers
  from one forward, which ``clip_layer([...])`` does publicly since 0.12);
- the caption embedder of a Z-Image MODEL (``model.diffusion_model.cap_embedder``): no public accessor.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch

import comfy.model_management
import comfy.sd
import comfy.sd1_clip
import comfy.utils
import folder_paths
from comfy.text_encoders import z_image
from comfy_api.latest import io

from ..dimfix.checkpoint import read_qwen3_checkpoint
from ..dimfix.conditioning import LAYER_KEY, MODEL_KEY
from ..dimfix.layers import comfy_to_hf_layer

log = logging.getLogger(__name__)

#: Inner text models of Z-Image-compatible CLIPs: Qwen3-4B (Z-Image's own, the pack's loader) and the
#: Qwen3-VL-4B CLIPs core builds from full VL checkpoints since 0.26 (layer -1, an empty think block).
TEXT_MODELS = {"qwen3_4b": "Qwen3", "qwen3vl_4b": "Qwen3-VL", "qwen3vl_8b": "Qwen3-VL"}
VL_NOTE = ("core Qwen3-VL CLIPs default to ComfyUI layer -1 (the last block before the final norm, not an HF "
           "hidden state) and append an empty <think> block to the chat template")


# ---------------------------------------------------------------------------------------- host capabilities
def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _list_layers_supported() -> bool:
    """Does this host's ``set_clip_options`` take a list of layers (0.12+)? Probed on a stand-in object."""
    probe = SimpleNamespace(layer="hidden", layer_idx=-2, return_projected_pooled=True, execution_device=None,
                            num_layers=4)
    try:
        comfy.sd1_clip.SDClipModel.set_clip_options(probe, {"layer": [1, 2]})
    except TypeError:
        return False
    return probe.layer == [1, 2]


LIST_LAYERS = _list_layers_supported()
SCHEMA_FIELDS = frozenset(f.name for f in dataclasses.fields(io.Schema))
DYNAMIC_VRAM = _accepts(comfy.sd.load_text_encoder_state_dicts, "disable_dynamic")


def schema(**fields) -> io.Schema:
    """``io.Schema`` with the fields this host's Schema does not know (e.g. ``search_aliases``) left out."""
    return io.Schema(**{k: v for k, v in fields.items() if k in SCHEMA_FIELDS})


# ---------------------------------------------------------------------------------------- progress, interrupt
def progress(total: int):
    return comfy.utils.ProgressBar(int(total))


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------- folders
FIX_TABLES = "fix_tables"
PACK_FIX_TABLES = Path(__file__).resolve().parent.parent / "fix_tables"


def text_encoder_dirs() -> list[str]:
    return list(folder_paths.get_folder_paths("text_encoders"))


def register_fix_tables_folder() -> None:
    """Register (idempotently) ``models/fix_tables`` and the pack's ``fix_tables/``, listing ``.safetensors``.

    Paths configured before (e.g. in ``extra_model_paths.yaml``) are kept, first.
    """
    paths, _ = folder_paths.folder_names_and_paths.get(FIX_TABLES, ([], set()))
    paths = list(paths)
    for p in (fix_tables_save_dir(), str(PACK_FIX_TABLES)):
        if p not in paths:
            paths.append(p)
    folder_paths.folder_names_and_paths[FIX_TABLES] = (paths, {".safetensors"})


def fix_tables_save_dir() -> str:
    return os.path.join(folder_paths.models_dir, FIX_TABLES)


def fix_table_files() -> list[str]:
    register_fix_tables_folder()
    return sorted(folder_paths.get_filename_list(FIX_TABLES))


def fix_table_path(name: str) -> str:
    """Full path of a listed fix table; the error names the folders searched."""
    register_fix_tables_folder()
    path = folder_paths.get_full_path(FIX_TABLES, name)
    if path is None:
        folders = folder_paths.folder_names_and_paths[FIX_TABLES][0]
        raise FileNotFoundError(f"fix table {name!r} not found in the fix_tables folders: {', '.join(folders)}")
    return path


# ---------------------------------------------------------------------------------------- text models
def text_model(clip, socket: str, node: str):
    """The Qwen3 / Qwen3-VL text model inside a CLIP; a clear error for any other encoder."""
    csm = getattr(clip, "cond_stage_model", None)
    name = getattr(csm, "clip", None)
    inner = getattr(csm, name, None) if isinstance(name, str) else None
    if name not in TEXT_MODELS or not hasattr(inner, "num_layers"):
        got = name if isinstance(name, str) else type(csm if csm is not None else clip).__name__
        raise ValueError(f"{node}: input '{socket}' must be a Qwen3 text encoder for Z-Image (Qwen3 Embedding "
                         f"Loader, or Load CLIP with a Qwen3-4B / Qwen3-VL file), got {got!r}")
    return inner


def text_model_kind(clip) -> str:
    """'Qwen3' or 'Qwen3-VL' for a CLIP :func:`text_model` accepts."""
    return TEXT_MODELS[clip.cond_stage_model.clip]


def depth(clip, socket: str, node: str) -> int:
    """Number of transformer blocks of the CLIP's text model (HF hidden_states has depth + 1 entries)."""
    return int(text_model(clip, socket, node).num_layers)


def with_layer(clip, comfy_index: int | list[int]):
    """A copy of ``clip`` that encodes with ComfyUI layer ``comfy_index`` (what CLIP Set Last Layer does), or
    with a list of HF indices at once (0.12+)."""
    out = clip.clone()
    out.clip_layer([int(k) for k in comfy_index] if isinstance(comfy_index, list) else int(comfy_index))
    return out


def _token_ids(tokens) -> list[int] | None:
    """Token ids of a one-encoder, one-section ``clip.tokenize`` result (None when not plain ids)."""
    if not isinstance(tokens, dict) or len(tokens) != 1:
        return None
    sections = next(iter(tokens.values()))
    if len(sections) != 1:
        return None
    ids = []
    for item in sections[0]:
        tok = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(tok, bool) or not isinstance(tok, int):
            return None  # an injected embedding: ids unknown
        ids.append(int(tok))
    return ids


def encode_layers(clip, text: str, layers: list[int], socket: str, node: str):
    """``(hidden [L, T, D] float32, token ids or None)`` of ``text`` at HF ``layers`` (non-negative), one forward.

    Tokenised as CLIP Text Encode does (the encoder's own chat template). On 0.12+ through the public
    ``clip_layer([...])`` + ``encode_from_tokens`` (model loading, device context, LoRA patches as usual);
    before that the text model's layer option is set directly and restored afterwards.
    """
    inner = text_model(clip, socket, node)
    tokens = clip.tokenize(text)
    if LIST_LAYERS:
        cond = with_layer(clip, list(layers)).encode_from_tokens(tokens)
    else:
        clip.load_model()
        try:
            inner.reset_clip_options()
            inner.layer = list(layers)
            inner.set_clip_options({"execution_device": clip.patcher.load_device})
            cond = clip.cond_stage_model.encode_token_weights(tokens)[0]
        finally:
            inner.reset_clip_options()
    if cond.dim() != 4 or cond.shape[0] != 1 or cond.shape[1] != len(layers):
        raise ValueError(f"{node}: '{socket}' returned hidden states of shape {tuple(cond.shape)}; expected "
                         f"[1, {len(layers)}, tokens, width]")
    return cond[0].float(), _token_ids(tokens)


def model_name(clip, socket: str, node: str) -> str:
    """The name the pack's loader recorded on the CLIP, else architecture, depth, vocabulary and width."""
    inner = text_model(clip, socket, node)
    named = getattr(inner, "dimfix_model_name", "")
    if isinstance(named, str) and named:
        return named
    shape = None
    try:
        shape = tuple(inner.transformer.get_input_embeddings().weight.shape)
    except (AttributeError, TypeError):
        pass
    detail = f", vocab {shape[0]}, width {shape[1]}" if shape and len(shape) == 2 else ""
    return f"{text_model_kind(clip)} ({inner.num_layers} layers{detail})"


# ---------------------------------------------------------------------------------------- the pack's CLIPs
class Qwen3AllTokensModel(z_image.Qwen3_4BModel):
    """ComfyUI's Qwen3 text-encoder wrapper with every token attended (attention mask all ones).

    The stock wrapper treats the first ``<|endoftext|>`` (its pad id) as the end of the sequence and masks it
    and every later token; Z-Image must never receive mask zeros, and the ``<|endoftext|>`` Qwen3-Embedding's
    tokenizer appends must be attended. Outputs record their source in the CONDITIONING (``dimfix_model``,
    ``dimfix_layer`` = HF index of the selected layer), which Embedding Dimension Fix checks against a table.
    """

    dimfix_model_name: str = ""

    def process_tokens(self, tokens, device):
        embeds, mask, num_tokens, info = super().process_tokens(tokens, device)
        ones = torch.ones_like(mask)
        return embeds, ones, [int(ones.shape[1])] * int(ones.shape[0]), info

    def forward(self, tokens):
        out = super().forward(tokens)
        if len(out) > 2 and self.layer == "hidden":  # one layer (not a list request of the analyzer)
            extra = dict(out[2])
            if self.dimfix_model_name:
                extra[MODEL_KEY] = self.dimfix_model_name
            hf = comfy_to_hf_layer(int(self.layer_idx), int(self.num_layers))
            if hf is not None:
                extra[LAYER_KEY] = hf - int(self.num_layers) - 1
            out = (*out[:2], extra)
        return out


#: ``SDTokenizer`` option (``{embedding_key}_min_padding``): pad tokens appended after the template.
APPEND_OPTION = "qwen3_4b_min_padding"


def build_clip(ckpt, dtype: torch.dtype, append_eos: bool, name: str, disable_dynamic: bool = False):
    """A native ComfyUI CLIP (Z-Image tokenizer and text-encoder wrapper) from a ``Qwen3Checkpoint``."""
    sd = dict(ckpt.state_dict)  # new mapping, same tensors
    norm = sd["model.norm.weight"]
    if norm.dtype != dtype:
        # ComfyUI takes the text encoder's weight dtype from this tensor (llama_detect); casting this one vector
        # selects it, and load_state_dict casts every other weight while copying it in.
        sd["model.norm.weight"] = norm.to(dtype)
    model_options = {"qwen3_4b_class": Qwen3AllTokensModel}  # a fresh dict per call (ComfyUI may mutate it)
    if ckpt.comfy_overrides():
        model_options["qwen3_4b_model_config"] = dict(ckpt.comfy_overrides())
    extra = {"disable_dynamic": True} if disable_dynamic and DYNAMIC_VRAM else {}
    embeddings = folder_paths.get_folder_paths("embeddings")
    if comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.QWEN3_4B:
        clip = comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.LUMINA2,
                                                      embedding_directory=embeddings, model_options=model_options,
                                                      **extra)
    else:  # ComfyUI detects Qwen3-4B only at width 2560; other widths (analysis, tests) get the same classes
        spec = SimpleNamespace(params={}, clip=z_image.te(dtype_llama=dtype), tokenizer=z_image.ZImageTokenizer)
        clip = comfy.sd.CLIP(spec, embedding_directory=embeddings, state_dict=[sd],
                             parameters=comfy.utils.calculate_parameters(sd), model_options=model_options, **extra)
    if append_eos:
        clip.set_tokenizer_option(APPEND_OPTION, 1)
    clip.cond_stage_model.qwen3_4b.dimfix_model_name = name  # shared by every clone of this CLIP
    return clip


def load_clip(path: str, ckpt, dtype: torch.dtype, append_eos: bool, name: str):
    """:func:`build_clip`, plus what ``clone(disable_dynamic=True)`` needs to rebuild it (DynamicVRAM hosts)."""
    clip = build_clip(ckpt, dtype, append_eos, name)
    clip.patcher.cached_patcher_init = (_reload_patcher, (path, dtype, append_eos, name))
    return clip


def _reload_patcher(path: str, dtype: torch.dtype, append_eos: bool, name: str, disable_dynamic: bool = False):
    """The factory ComfyUI calls (as for core ``load_clip``) to rebuild a CLIP's patcher from its file."""
    clip = build_clip(read_qwen3_checkpoint(path), dtype, append_eos, name, disable_dynamic=disable_dynamic)
    return clip.patcher


# ---------------------------------------------------------------------------------------- diffusion model
def caption_embedder(model, node: str):
    """``(gain, weight, bias, eps)`` of a Z-Image / Lumina2 MODEL's caption embedder (RMSNorm → Linear).

    The module's stored weights are read (a LoRA patch on the caption embedder is not applied).
    """
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    cap = getattr(dm, "cap_embedder", None)
    try:
        norm, linear = cap[0], cap[1]
        gain, weight = norm.weight, linear.weight
    except (TypeError, IndexError, AttributeError):
        raise ValueError(f"{node}: input 'model' is not a Z-Image (Lumina2/NextDiT) diffusion model: it has no "
                         "caption embedder 'cap_embedder' = RMSNorm -> Linear") from None
    return gain, weight, getattr(linear, "bias", None), getattr(norm, "eps", None)
