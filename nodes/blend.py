"""Embedding Blend: mix two CONDITIONINGs; the primary sets the token count."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..dimfix import blend
from ..dimfix import conditioning as cond_utils
from ..dimfix.fixtable import FixTable
from . import comfy_access as host
from .common import CATEGORY, NO_FILE, FixTableSocket, check_width, resolve_table, table_file_fingerprint, \
    table_file_input

log = logging.getLogger(__name__)


class EmbeddingBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return host.schema(
            node_id="DimFixEmbeddingBlend",
            search_aliases=["dimfix", "conditioning blend", "embedding mix", "encoder ensemble"],
            display_name="Embedding Blend",
            category=CATEGORY,
            description="alpha·primary + (1 − alpha)·secondary, with the secondary resampled to the primary's "
                        "token count. For Qwen3-4B × Qwen3-Embedding ensembles (alpha 0.7–0.9), layer −2 × −6 "
                        "mixes, or VL × text. Output: the primary's entries and length, all-ones mask.",
            inputs=[
                io.Conditioning.Input("primary",
                                      tooltip="Sets the token count and keeps its pooled output, e.g. the "
                                              "Qwen3-4B (reference) conditioning or the text conditioning."),
                io.Conditioning.Input("secondary",
                                      tooltip="Mixed into every primary entry. If it has several entries only the "
                                              "first is used."),
                io.Float.Input("alpha", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Weight of the PRIMARY (like Conditioning Average's "
                                       "conditioning_to_strength): 1 = primary only, 0 = secondary only. "
                                       "0.7–0.9 for encoder ensembles."),
                io.Combo.Input("align", options=list(blend.ALIGN_MODES), default="pool",
                               tooltip="How the secondary is brought to the primary's length. pool (default): "
                                       "adaptive average pooling, every token contributes. interp: anti-aliased "
                                       "linear interpolation. truncate: cut, or pad with the secondary's own "
                                       "mean. pad_mean: cut, or pad with the table's reference mean."),
                io.Combo.Input("outliers", options=list(blend.OUTLIER_MODES), default="none",
                               tooltip="Treat the secondary's outlier dims (std ratio vs the reference beyond τ, "
                                       "both ways; needs a fix table for the secondary's encoder). mean: set to "
                                       "the reference mean. rescale: scale about their mean to the edge of the "
                                       "accepted band (τ·σ_ref or σ_ref/τ). clamp: clamp to the reference range."),
                io.Boolean.Input("rms_match", default=True,
                                 tooltip="Scale each secondary token to the RMS of the aligned primary token "
                                         "before mixing, so alpha weighs directions, not loudness (Z-Image "
                                         "RMS-normalises every token)."),
                table_file_input("Saved fix table (reference vs the secondary's encoder) for outliers and "
                                 "pad_mean; ignored when a FIX_TABLE is connected."),
                FixTableSocket.Input("fix_table", optional=True,
                                     tooltip="Fix table for outlier handling and pad_mean; takes precedence over "
                                             "table_file."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="The blend: the primary's entries, token count and pooled output, "
                                               "all-ones attention mask."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, table_file: str = NO_FILE, **kwargs) -> tuple:
        return table_file_fingerprint(table_file)

    @classmethod
    def execute(cls, primary, secondary, alpha: float, align: str, outliers: str, rms_match: bool,
                table_file: str = NO_FILE, fix_table: FixTable | None = None) -> io.NodeOutput:
        node = "Embedding Blend"
        cond_utils.validate(primary, socket="primary", node=node)
        cond_utils.validate(secondary, socket="secondary", node=node)
        if len(secondary) > 1:
            log.info("%s: the secondary has %d entries; only the first is used", node, len(secondary))
        sec = secondary[0][0]
        for i, (t, _) in enumerate(primary):
            if t.shape[-1] != sec.shape[-1]:
                raise ValueError(f"{node}: primary entry {i} has width {t.shape[-1]} but the secondary has width "
                                 f"{sec.shape[-1]}; blend conditionings of the same width")
        table = None
        if outliers != "none" or align == "pad_mean" or fix_table is not None or table_file != NO_FILE:
            table = resolve_table(fix_table, table_file, node)
            check_width(secondary[:1], table, "secondary", node)

        def mix(t, _meta):
            if sec.shape[0] not in (1, t.shape[0]):
                raise ValueError(f"{node}: secondary batch {sec.shape[0]} must be 1 or the primary's batch "
                                 f"{t.shape[0]}")
            return blend.blend(t, sec.to(t.device), alpha, align=align, outliers=outliers, table=table,
                               rms_match=rms_match)

        # a mix is neither encoder's output: the primary's recorded source no longer describes it
        return io.NodeOutput(cond_utils.map_tensors(primary, mix, drop_keys=cond_utils.SOURCE_KEYS))
