"""Embedding Dimension Fix: apply a fix table to every entry of a CONDITIONING."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..dimfix import conditioning as cond_utils
from ..dimfix import fixes
from ..dimfix.config import Thresholds
from ..dimfix.fixtable import FixTable
from ..dimfix.repair import AUTO, LEARNED_MODES, fix_function, resolve_mode
from ..dimfix.tokens import SCOPES
from . import comfy_access as host
from .common import CATEGORY, NO_FILE, FixTableSocket, check_width, resolve_table, table_file_fingerprint, \
    table_file_input

log = logging.getLogger(__name__)



def warn_provenance(table: FixTable, cond: list, scope: str, node: str) -> None:
    """Log warnings when what is known about the input differs from the table's metadata."""
    meta = table.meta
    if meta.layer == "sweep":
        log.warning("%s: the fix table was recorded for a layer sweep, not one layer; its statistics may not match "
                    "the conditioning's layer", node)
    if meta.token_scope and meta.token_scope != scope:
        log.warning("%s: the fix table's statistics cover %r tokens but the fix is applied to %r tokens", node,
                    meta.token_scope, scope)
    for message in cond_utils.provenance_warnings(cond, meta.target_model, meta.layer):
        log.warning("%s: %s", node, message)


def thresholds_for(table: FixTable, outlier_ratio: float, hyper_mult: float, clamp_sigma: float) -> Thresholds:
    """The table's thresholds with the non-zero overrides applied."""
    base = table.meta.thresholds
    over = {k: float(v) for k, v in (("outlier_ratio", outlier_ratio), ("hyper_mult", hyper_mult),
                                     ("clamp_sigma", clamp_sigma)) if v}
    if "outlier_ratio" in over and over["outlier_ratio"] <= 1.0:
        raise ValueError(f"outlier_ratio must be > 1 (or 0 to use the table's value), got {over['outlier_ratio']}")
    return Thresholds(**{**base.__dict__, **over}) if over else base


class EmbeddingDimensionFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return host.schema(
            node_id="DimFixEmbeddingDimensionFix",
            search_aliases=["dimfix", "fix table", "dimension fix", "text encoder swap", "embedding fix"],
            display_name="Embedding Dimension Fix",
            category=CATEGORY,
            description="Corrects a substitute encoder's CONDITIONING dimension by dimension with a fix table "
                        "(reference vs target statistics), so Z-Image sees the per-dimension distribution it was "
                        "trained on. Every entry is fixed; token count, pooled output and an all-ones mask are kept.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Conditioning from the substitute (target) encoder."),
                io.Combo.Input("mode", options=[AUTO, *fixes.MODES, *LEARNED_MODES], default=AUTO,
                               tooltip="auto = the table's recommended mode (measured on held-out prompts). "
                                       "rescale/mask/clamp act about 0 (the original research's formulas)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0 = unchanged, 1 = fully fixed. For affine it is λ: the std ratio is "
                                       "applied as (σ_ref/σ_tgt)^λ and the mean moves by λ."),
                io.Combo.Input("token_scope", options=list(SCOPES), default="content",
                               tooltip="Tokens to fix. content (default): prompt tokens only; the attention-sink "
                                       "token and the chat-template tokens pass unchanged (their massive "
                                       "activations are what Z-Image expects). no_sink: all but position 0. "
                                       "all: every token (the original research)."),
                table_file_input("A saved fix table from models/fix_tables; ignored when a FIX_TABLE is "
                                 "connected."),
                FixTableSocket.Input("fix_table", optional=True,
                                     tooltip="Fix table from the Dimension Analyzer; takes precedence over "
                                             "table_file."),
                io.Float.Input("outlier_ratio", default=0.0, min=0.0, max=1000.0, step=0.1, optional=True,
                               tooltip="Override τ: a dim is an outlier when σ_tgt/σ_ref > τ or < 1/τ. "
                                       "0 = the table's value (3 by default)."),
                io.Float.Input("hyper_mult", default=0.0, min=0.0, max=1000.0, step=0.1, optional=True,
                               tooltip="Override: hyperactive when σ > hyper_mult × the model's median σ "
                                       "(clamp mode). 0 = the table's value (5 by default)."),
                io.Float.Input("clamp_sigma", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Override k of the ±k·σ_ref clamps (clamp; clamp_pct without "
                                       "percentiles). 0 = the table's value (3 by default)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="The fixed conditioning: same entries and token count, all-ones "
                                               "attention mask, pooled output kept."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, table_file: str = NO_FILE, **kwargs) -> tuple:
        return table_file_fingerprint(table_file)

    @classmethod
    def execute(cls, conditioning, mode: str, strength: float, token_scope: str, table_file: str = NO_FILE,
                fix_table: FixTable | None = None, outlier_ratio: float = 0.0, hyper_mult: float = 0.0,
                clamp_sigma: float = 0.0) -> io.NodeOutput:
        node = "Embedding Dimension Fix"
        cond_utils.validate(conditioning, socket="conditioning", node=node)
        table = resolve_table(fix_table, table_file, node)
        check_width(conditioning, table, "conditioning", node)
        warn_provenance(table, conditioning, token_scope, node)
        th = thresholds_for(table, outlier_ratio, hyper_mult, clamp_sigma)
        try:
            apply = fix_function(table, mode, strength, th, token_scope)  # fallbacks are logged
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None

        def fix(t, _meta):
            return apply(t)

        done = f"{resolve_mode(table, mode)} at strength {float(strength):g}, table " \
               f"{table.meta.target_model or 'target'} vs " \
               f"{table.meta.reference_model or 'reference'}"
        return io.NodeOutput(cond_utils.map_tensors(conditioning, fix, set_keys={cond_utils.FIX_KEY: done}))
