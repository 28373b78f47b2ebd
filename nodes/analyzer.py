"""Dimension Analyzer: encode a prompt corpus with two text encoders and measure per-dim differences.

The node only encodes and feeds :class:`dimfix.analysis.CorpusAnalysis`. Each prompt is encoded the
way ``CLIPTextEncode`` does it (``clip.tokenize(text)`` — the Z-Image chat template — then the
encoder's forward), but the encoder is asked for HF ``hidden_states`` layers directly (one layer,
or every layer at once for a sweep): one forward per prompt and encoder, whatever the layer count.
A ``CLIP Set Last Layer`` upstream is therefore ignored: the ``layer`` widget decides. LoRA patches
on the encoders apply as usual (``clip.load_model()``); scheduled CLIP hooks are not evaluated.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

import torch
from comfy_api.latest import io, ui

from ..dimfix.analysis import CorpusAnalysis, analyze_conditioning_pairs
from ..dimfix.dit import CapEmbedder
from ..dimfix.config import Thresholds
from ..dimfix.corpus import default_corpus_path, load_default_corpus, parse_corpus
from ..dimfix.fixtable import save_fix_table
from ..dimfix.layers import LayerIndexError, plan_analysis_layers
from ..dimfix.plots import to_image_batch
from ..dimfix.repair import RepairStudy, study_order
from ..dimfix.tokens import SCOPES, ZIMAGE_TEMPLATE, classify_ids, classify_positions
from . import comfy_access as host
from .common import CATEGORY, FixTableSocket

log = logging.getLogger(__name__)

NODE = "Dimension Analyzer"
_SAVE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


def _default_prompts() -> str:
    try:
        return default_corpus_path().read_text(encoding="utf-8")
    except OSError:
        return ""


def _distinct(names: tuple[str, str]) -> tuple[str, str]:
    return names if names[0] != names[1] else (f"{names[0]} [reference]", f"{names[1]} [target]")


def _cond_name(cond, default: str) -> str:
    """The ``dimfix_model`` entry a pack node may have recorded in the CONDITIONING, else ``default``."""
    try:
        name = cond[0][1].get("dimfix_model")
    except (IndexError, KeyError, TypeError, AttributeError):
        name = None
    return str(name) if name else default



# ---------------------------------------------------------------------------- node
class DimensionAnalyzer(io.ComfyNode):
    """Measure how a target text encoder's hidden-state dimensions differ from the reference's."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return host.schema(
            node_id="DimFixDimensionAnalyzer",
            search_aliases=["dimfix", "fix table", "embedding analysis", "text encoder swap", "qwen3 embedding"],
            display_name="Dimension Analyzer",
            category=CATEGORY,
            description=(
                "Encodes a prompt corpus with a reference text encoder (what Z-Image was trained on, Qwen3-4B) "
                "and a target encoder (the substitute) and compares every hidden dimension: std ratios, "
                "outlier / dead / hyperactive dims, consistent vs prompt-specific outliers, the verdict, and "
                "optionally the DiT's caption-embedder view. Outputs a fix table for Embedding Dimension Fix, a "
                "markdown report and plots; can save the table to models/fix_tables."),
            is_output_node=True,
            inputs=[
                io.Clip.Input("reference", optional=True,
                              tooltip="Reference text encoder (e.g. Qwen3-4B as loaded for Z-Image). Optional when "
                                      "the conditioning pair is connected."),
                io.Clip.Input("target", optional=True,
                              tooltip="Target text encoder to compare (e.g. Qwen3-Embedding-4B, a fine-tune). "
                                      "Optional when the conditioning pair is connected."),
                io.String.Input("prompts", multiline=True, default=_default_prompts(),
                                tooltip="Calibration prompts, one per line ('#' comments and blank lines ignored). "
                                        "Empty = the pack's calibration corpus (fix_tables/calibration_prompts.txt). "
                                        "The Z-Image chat template is added automatically."),
                io.Int.Input("layer", default=-2, min=-64, max=64,
                             tooltip="Target's hidden layer in Hugging Face hidden_states indexing (-2 = Z-Image "
                                     "default, -6 is the usual choice for VL encoders; 0 = embeddings, -1 = final "
                                     "normed output). In conditioning mode it is only recorded in the table."),
                io.Int.Input("reference_layer", default=-2, min=-64, max=64,
                             tooltip="Reference's hidden layer, HF indexing. Keep -2: it is what Z-Image was trained "
                                     "on. When it differs from 'layer' the table pairs the target at 'layer' with "
                                     "the reference at this layer (and a sweep compares every target layer with it)."),
                io.Boolean.Input("sweep_all_layers", default=False,
                                 tooltip="Also analyse every layer (all from the same single forward per prompt): "
                                         "the report adds a per-layer table and a recommended target layer."),
                io.Float.Input("outlier_ratio", default=3.0, min=1.01, max=1000.0, step=0.1,
                               tooltip="τ: a dim is an outlier when σ_target/σ_reference > τ or < 1/τ."),
                io.Float.Input("dead_abs", default=0.01, min=0.0, max=100.0, step=0.001,
                               tooltip="A dim is dead when its σ is below this value."),
                io.Float.Input("hyper_mult", default=5.0, min=1.0, max=1000.0, step=0.5,
                               tooltip="A dim is hyperactive when its σ exceeds this multiple of the model's "
                                       "median σ."),
                io.Combo.Input("token_scope", options=list(SCOPES), default="content",
                               tooltip="Tokens the statistics cover: content = the prompt's own tokens (default); "
                                       "no_sink = all but position 0 and an appended EOS; all = every token."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional Z-Image diffusion model: adds the DiT-aware view (caption-embedder "
                                       "sensitivity ranking and cosine in caption-embedder space)."),
                io.Conditioning.Input("reference_conditioning", optional=True,
                                      tooltip="Optional: reference conditionings produced elsewhere (one per prompt, "
                                              "[batch, tokens, width]); used with 'target_conditioning' instead of "
                                              "the encoders and prompts. Token classes are assumed from the Z-Image "
                                              "template by position."),
                io.Conditioning.Input("target_conditioning", optional=True,
                                      tooltip="Optional: target conditionings paired entry by entry with "
                                              "'reference_conditioning' (e.g. from a VL encoder)."),
                io.String.Input("save_name", default="",
                                tooltip="Save the table as models/fix_tables/<save_name>.safetensors; empty = don't "
                                        "save. Letters, digits, '.', '_', '-', spaces."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing table file of the same name (otherwise the run stops "
                                         "with an error before encoding)."),
            ],
            outputs=[
                FixTableSocket.Output(display_name="fix_table",
                                      tooltip="Per-dim reference and target statistics for Embedding Dimension Fix."),
                io.String.Output(display_name="report", tooltip="Markdown report: verdict, top dims, consistency, "
                                                                "token classes, DiT view, layer sweep."),
                io.Image.Output(display_name="plots", tooltip="Ratio histogram, σ scatter, top outliers, class "
                                                             "counts (and a layer heatmap for sweeps)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, prompts="", layer=-2, reference_layer=-2, sweep_all_layers=False,
                           outlier_ratio=3.0, dead_abs=0.01, hyper_mult=5.0, token_scope="content",
                           save_name="", overwrite=False, **linked) -> str:
        """Widget values, plus the state of the save destination: linked inputs (encoders, model,
        conditionings) arrive as None here, so their identity cannot be part of this fingerprint; ComfyUI
        already re-runs the node when an upstream output changes (e.g. another checkpoint is loaded), and
        otherwise reuses the cached result -- unless the saved table was deleted or replaced since."""
        key = repr((prompts, layer, reference_layer, sweep_all_layers, outlier_ratio, dead_abs,
                    hyper_mult, token_scope, save_name, overwrite, _dest_state(save_name)))
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    @classmethod
    def execute(cls, prompts: str = "", layer: int = -2, reference_layer: int = -2, sweep_all_layers: bool = False,
                outlier_ratio: float = 3.0, dead_abs: float = 0.01, hyper_mult: float = 5.0,
                token_scope: str = "content", reference=None, target=None, model=None,
                reference_conditioning=None, target_conditioning=None, save_name: str = "",
                overwrite: bool = False) -> io.NodeOutput:
        if token_scope not in SCOPES:
            raise ValueError(f"{NODE}: token_scope must be one of {list(SCOPES)}, got {token_scope!r}")
        try:
            thresholds = Thresholds(outlier_ratio=float(outlier_ratio), dead_abs=float(dead_abs),
                                    hyper_mult=float(hyper_mult))
        except ValueError as exc:
            raise ValueError(f"{NODE}: {exc}") from None
        dest = _save_path(save_name, overwrite)

        cond_mode = reference_conditioning is not None or target_conditioning is not None
        if cond_mode:
            if reference_conditioning is None or target_conditioning is None:
                raise ValueError(f"{NODE}: connect both 'reference_conditioning' and 'target_conditioning' (or neither "
                                 "and use the 'reference' / 'target' encoders)")
            if sweep_all_layers:
                raise ValueError(f"{NODE}: sweep_all_layers needs the 'reference' and 'target' encoders; conditionings "
                                 "hold one layer only")
            if reference is not None or target is not None:
                log.info("%s: conditioning pair connected; the encoder inputs are not used", NODE)
            pbar = host.progress(1)

            def step(done: int, total: int) -> None:
                pbar.update_absolute(done, total)
                host.check_interrupt()

            an = analyze_conditioning_pairs(reference_conditioning, target_conditioning, layer=int(layer),
                                            reference_layer=int(reference_layer), thresholds=thresholds,
                                            token_scope=token_scope, cap_weights=_cap_weights(model), node=NODE,
                                            step=step)
            study = None
            names = (_cond_name(reference_conditioning, "reference conditioning"),
                     _cond_name(target_conditioning, "target conditioning"))
            template = ""
        else:
            if reference is None or target is None:
                raise ValueError(f"{NODE}: connect both text encoders 'reference' and 'target', or the conditioning "
                                 "pair 'reference_conditioning' / 'target_conditioning'")
            an, study = _encoder_analysis(reference, target, prompts, layer, reference_layer,
                                          bool(sweep_all_layers), thresholds, token_scope, model)
            names = (host.model_name(reference, "reference", NODE), host.model_name(target, "target", NODE))
            template = ZIMAGE_TEMPLATE

        names = _distinct(names)
        result = an.finish(reference_model=names[0], target_model=names[1])
        table = result.fix_table(template=template)
        report = result.report_markdown() + _vl_note(reference, target, cond_mode)
        if study is not None:  # the learned modes and the held-out evaluation of every mode
            host.check_interrupt()
            repair = study.finish(table, thresholds)
            table = repair.extend(table)
            report += "\n" + repair.markdown()
        else:
            report += "\nThe repair study (learned modes, held-out evaluation) needs the encoders and token ids; " \
                      "it does not run on a conditioning pair.\n"
        images = to_image_batch(result.plots())
        if dest is not None:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            saved = save_fix_table(table, dest, overwrite=bool(overwrite))
            report += f"\nSaved the table to `{saved}`.\n"
            log.info("%s: saved fix table to %s", NODE, saved)
        for w in result.warnings[:20]:
            log.warning("%s: %s", NODE, w)
        # the plots as the node's image preview, the report as its text (markdown on frontends that render it)
        return io.NodeOutput(table, report, images, ui={**ui.PreviewImage(images, cls=cls).as_dict(), "text": [report]})


def _vl_note(reference, target, cond_mode: bool) -> str:
    if cond_mode:
        return ""
    sides = [side for side, clip in (("reference", reference), ("target", target))
             if host.text_model_kind(clip) == "Qwen3-VL"]
    if not sides:
        return ""
    return (f"\n**Qwen3-VL:** the {' and '.join(sides)} encoder is a core Qwen3-VL CLIP: {host.VL_NOTE}; its 4 think "
            "tokens count as template tokens here. Z-Image was trained on Qwen3-4B without them.\n")


def _positions(select: list[int] | str, n_states: int) -> list[int]:
    return list(range(n_states)) if select == "all" else sorted(set(select))


def _encoder_analysis(reference, target, prompts: str, layer: int, reference_layer: int, sweep: bool,
                      thresholds: Thresholds, token_scope: str, model) -> tuple[CorpusAnalysis, RepairStudy]:
    """Encode every corpus prompt with both encoders (one forward each) and feed the analysis."""
    text = prompts if isinstance(prompts, str) else ""
    corpus = load_default_corpus() if not text.strip() else parse_corpus(text, source="prompts")
    for note in corpus.notes:
        log.info("%s: %s", NODE, note)
    n_ref, n_tgt = host.depth(reference, "reference", NODE) + 1, host.depth(target, "target", NODE) + 1
    try:
        lp = plan_analysis_layers(layer, reference_layer, n_tgt, n_ref, sweep)
    except LayerIndexError as e:
        raise ValueError(f"{NODE}: {e}") from None
    an = study = None
    ref_pos, tgt_pos = _positions(lp.select_reference, n_ref), _positions(lp.select_target, n_tgt)
    # the repair study works on the table's layer pair: the primary target layer and its reference layer
    j_ref = ref_pos.index((lp.primary if lp.reference_layer is None else lp.reference_layer) + n_ref)
    j_tgt = tgt_pos.index(lp.primary + n_tgt)
    pbar = host.progress(len(corpus.prompts))
    for i in study_order(corpus.prompts):  # the repair study fits on training prompts before held-out ones
        prompt = corpus.prompts[i]
        host.check_interrupt()
        r, r_ids = host.encode_layers(reference, prompt, ref_pos, "reference", NODE)
        t, t_ids = host.encode_layers(target, prompt, tgt_pos, "target", NODE)
        if r.shape[-1] != t.shape[-1]:
            raise ValueError(f"{NODE}: the encoders have different widths (reference {r.shape[-1]}, target "
                             f"{t.shape[-1]}); a fix table needs the same hidden size")
        if an is None:
            an = CorpusAnalysis(r.shape[-1], layers=lp.labels, thresholds=thresholds, token_scope=token_scope,
                                primary_layers=[lp.primary], reference_layer=lp.reference_layer)
            weights = _cap_weights(model)  # read once: the analysis and the repair study share them
            cap = None if weights is None else CapEmbedder.from_weights(*weights)
            if weights is not None:
                an.set_dit(*weights)
            study = RepairStudy(r.shape[-1], cap)
        r_lab, t_lab = _labels(r_ids, r.shape[1]), _labels(t_ids, t.shape[1])
        an.add_prompt(r, t, r_lab, t_lab, prompt=prompt, ref_ids=r_ids, tgt_ids=t_ids, index=i)
        study.add_prompt(prompt, r[j_ref], t[j_tgt], r_ids, t_ids, r_lab, t_lab)
        pbar.update(1)
    return an, study


def _labels(ids: list[int] | None, n: int) -> torch.Tensor:
    return classify_ids(ids) if ids is not None else classify_positions(n)


def _cap_weights(model) -> tuple | None:
    return None if model is None else host.caption_embedder(model, NODE)


def _dest_state(save_name: str) -> tuple | None:
    """``(size, mtime)`` of the table file ``save_name`` would write, ``()`` when absent, None when not saving."""
    try:
        dest = _save_path(save_name, overwrite=True)
    except ValueError:
        return None  # a bad name: execute() reports it
    if dest is None:
        return None
    try:
        st = os.stat(dest)
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns)


def _save_path(save_name: str, overwrite: bool) -> str | None:
    """``<models_dir>/fix_tables/<save_name>.safetensors``, or None; refuses bad names and silent overwrites."""
    name = (save_name or "").strip()
    if not name:
        return None
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _SAVE_NAME_RE.match(name) or ".." in name:
        raise ValueError(f"{NODE}: save_name {save_name!r} is not a plain file name; use letters, digits, '.', '_', "
                         "'-' and spaces (no folders); the table goes to models/fix_tables/<save_name>.safetensors")
    host.register_fix_tables_folder()
    dest = os.path.join(host.fix_tables_save_dir(), name + ".safetensors")
    if os.path.exists(dest) and not overwrite:
        raise ValueError(f"{NODE}: {dest} already exists; set 'overwrite' to true to replace it, or choose another "
                         "save_name")
    return dest
