"""Generate the bundled workflows (``workflows/*.json`` UI format + ``workflows/api/*.json`` API twins).

    cd tests && python -m zdf_testkit.build_workflows            # write the workflows from the specs table
    cd tests && COMFYUI_PATH=... python -m zdf_testkit.build_workflows --refresh-specs   # re-read node specs

The node socket/widget layout comes from ``workflow_node_specs.json`` (see ``workflow_specs``), which
``--refresh-specs`` regenerates from a live ComfyUI with the pack loaded; the host tier checks that the
table still matches. Models, settings and notes are defined here, once, for both formats.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .workflow_builder import Column, Graph, write_json
from .workflow_specs import load_specs

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"

# ------------------------------------------------------------------------------------------ models
HF = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files"
DIT = {"name": "z_image_turbo_bf16.safetensors", "url": f"{HF}/diffusion_models/z_image_turbo_bf16.safetensors",
       "directory": "diffusion_models"}
TE = {"name": "qwen_3_4b.safetensors", "url": f"{HF}/text_encoders/qwen_3_4b.safetensors",
      "directory": "text_encoders"}
VAE = {"name": "ae.safetensors", "url": f"{HF}/vae/ae.safetensors", "directory": "vae"}
DIT_BASE = {"name": "z_image_bf16.safetensors",
            "url": "https://huggingface.co/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/"
                   "z_image_bf16.safetensors", "directory": "diffusion_models"}
SUBSTITUTE = "Qwen3-Embedding-4B"  # a Hugging Face folder in models/text_encoders
SUBSTITUTE_URL = "https://huggingface.co/Qwen/Qwen3-Embedding-4B"

# ------------------------------------------------------------------------------------------ settings
PROMPT = "A cat sleeping in sunlight"
SEED = 42
STEPS, CFG, SAMPLER, SCHEDULER = 4, 1.0, "res_multistep", "simple"  # the ComfyUI 0.8 Z-Image Turbo template
SHIFT = 3.0
SIZE = 1024
#: The original research's fix modes.
ORIGIN_MODES = ("none", "rescale", "mask", "clamp", "full")
BEST_MODE = "auto"  # the fix table's recommended mode, measured on held-out prompts
GRID_MODES = (*ORIGIN_MODES, "affine", "adapter")
NODE_IDS = {"loader": "DimFixQwen3EmbeddingLoader", "layers": "DimFixHiddenLayerSelect",
            "analyzer": "DimFixDimensionAnalyzer", "fix": "DimFixEmbeddingDimensionFix",
            "blend": "DimFixEmbeddingBlend", "grid": "DimFixComparisonGrid"}
PACK_TYPES = set(NODE_IDS.values())
CORE_TYPES = ("UNETLoader", "ModelSamplingAuraFlow", "CLIPLoader", "VAELoader", "CLIPTextEncode",
              "ConditioningZeroOut", "EmptySD3LatentImage", "KSampler", "VAEDecode", "SaveImage", "PreviewAny",
              "PrimitiveInt", "PrimitiveStringMultiline", "MarkdownNote")
#: Every node type the bundled workflows may use (the specs table covers exactly these).
USED_TYPES = (*CORE_TYPES, *sorted(PACK_TYPES))

SAMPLING_NOTE = (
    "**Sampling.** Stock Z-Image Turbo settings of ComfyUI 0.8's template: `res_multistep` / `simple`, "
    f"{STEPS} steps, cfg 1 (the negative is unused at cfg 1 — it is a zeroed copy, as in the template), "
    f"ModelSamplingAuraFlow shift {SHIFT:g}, {SIZE}×{SIZE}, seed {SEED} (fixed, shared by every sampler so "
    "the images differ only by their conditioning). The original research sampled 9 steps with diffusers' "
    "Euler: set `steps` to 8–9 for closer parity; images will not be pixel-identical to it either way.")
def first_run_note(dit: dict = DIT) -> str:
    """What to download before the first run. The frontend's missing-models warning lists the single files
    declared on the stock loaders; it cannot list a folder, so the substitute encoder is named here."""
    return (
        f"**Before the first run — substitute encoder.** Download the whole [{SUBSTITUTE}]({SUBSTITUTE_URL}) "
        f"folder (config.json + model-*.safetensors shards + index) into `models/text_encoders/{SUBSTITUTE}/`, "
        f"e.g. `huggingface-cli download Qwen/{SUBSTITUTE} --local-dir models/text_encoders/{SUBSTITUTE}`, then "
        "refresh the page (R) and pick it in **Qwen3 Embedding Loader** — or pick any other Qwen3 checkpoint "
        "it lists. ComfyUI's missing-models warning cannot list a folder, so it names only the files below.\n\n"
        f"**Other models** (offered by the missing-models warning): `models/diffusion_models/{dit['name']}`, "
        f"`models/text_encoders/{TE['name']}` (reference encoder), `models/vae/{VAE['name']}` — from "
        "[Comfy-Org](https://huggingface.co/Comfy-Org).\n\n"
        "**Node help:** select a node and click (i) *Node Info* in the toolbar above it.")


def pack_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.M)
    if not m:
        raise ValueError("pyproject.toml has no version")
    return m.group(1)


def new_graph(specs: dict, workflow_id: str) -> Graph:
    return Graph(specs, PACK_TYPES, pack_version(), workflow_id=workflow_id)


# ------------------------------------------------------------------------------------------ blocks
# ------------------------------------------------------------------------------------------ layout
#: Column pitch and vertical gap: compact, so that the saved view (fitted to a 1280×800 window by the
#: builder) stays above the frontend's low-detail zoom (~0.57) for the smaller workflows.
PITCH, GAP = 340, 20
NOTE_W = 400


def col(k: int, y: float = 0.0) -> Column:
    return Column(k * PITCH, y, gap=GAP)


def note(g: Graph, text: str, pos=(-NOTE_W - 30, 0), size=(NOTE_W, 520), dit: dict = DIT):
    """The "Read me" note, left of the graph: a title line, the first-run block, then ``text``."""
    head, _, rest = text.partition("\n\n")
    full = f"{head}\n\n{first_run_note(dit)}\n\n{rest}"
    return g.add("MarkdownNote", pos, title="Read me", widgets={"text": full}, size=size)


def dit_chain(g: Graph, col: Column, dit: dict = DIT):
    unet = g.add("UNETLoader", col, widgets={"unet_name": dit["name"], "weight_dtype": "default"}, models=[dit])
    ms = g.add("ModelSamplingAuraFlow", col, widgets={"shift": SHIFT}, inputs={"model": (unet, 0)})
    return unet, ms


def reference_clip(g: Graph, pos):
    return g.add("CLIPLoader", pos, title="Reference encoder (Qwen3-4B)",
                 widgets={"clip_name": TE["name"], "type": "lumina2", "device": "default"}, models=[TE])


def substitute_clip(g: Graph, pos):
    """The pack's loader with the substitute encoder (widget values from the loader's spec)."""
    spec = g.specs[NODE_IDS["loader"]]
    widgets = {}
    for i in spec["inputs"]:
        if not i["widget"]:
            continue
        widgets[i["name"]] = LOADER_WIDGETS[i["name"]]
    return g.add(NODE_IDS["loader"], pos, title=f"Substitute encoder ({SUBSTITUTE})", widgets=widgets)


#: Widget values of the Qwen3 Embedding Loader in the bundled workflows.
LOADER_WIDGETS = {"model_name": SUBSTITUTE, "dtype": "default", "append_eos": False, "analysis_only": False}


def vae_loader(g: Graph, pos):
    return g.add("VAELoader", pos, widgets={"vae_name": VAE["name"]}, models=[VAE])


def prompt_and_seed(g: Graph, col: Column):
    prompt = g.add("PrimitiveStringMultiline", col, title="Prompt", widgets={"value": PROMPT})
    seed = g.add("PrimitiveInt", col, title="Seed", widgets={"value": SEED},
                 control={"value": "fixed"})
    return prompt, seed


def encode(g: Graph, clip, prompt, pos, title):
    return g.add("CLIPTextEncode", pos, title=title, widgets={"text": ""},
                 inputs={"clip": (clip, 0), "text": (prompt, 0)})


def sampler(g: Graph, model, positive, negative, latent, seed, pos, title, steps: int = STEPS, cfg: float = CFG):
    return g.add("KSampler", pos, title=title,
                 widgets={"seed": SEED, "steps": steps, "cfg": cfg, "sampler_name": SAMPLER, "scheduler": SCHEDULER,
                          "denoise": 1.0},
                 inputs={"model": (model, 0), "positive": (positive, 0), "negative": (negative, 0),
                         "latent_image": (latent, 0), "seed": (seed, 0)}, control={"seed": "fixed"})


def decode(g: Graph, samples, vae, pos):
    return g.add("VAEDecode", pos, inputs={"samples": (samples, 0), "vae": (vae, 0)}, size=(210, 46))


def sample_and_decode(g: Graph, column: Column, model, positive, negative, latent, seed, vae, title, **kw):
    """A KSampler and, below it in the same column, its VAE Decode."""
    ks = sampler(g, model, positive, negative, latent, seed, column, title, **kw)
    return decode(g, ks, vae, column)


def grid(g: Graph, images: list, labels: list[str], prompt, pos, title: str, columns: int = 0,
         size=(400, 330)):
    inputs = {"reference": (images[0], 0), "subtitle": (prompt, 0)}
    for k, im in enumerate(images[1:], start=1):
        inputs[f"image_{k}"] = (im, 0)
    return g.add(NODE_IDS["grid"], pos, title="Fix Comparison Grid",
                 widgets={"labels": "\n".join(labels), "title": title, "subtitle": "", "columns": columns,
                          "fit": "pad"}, inputs=inputs, size=size)


def save(g: Graph, image, pos, prefix: str, size=(400, 300), slot: int = 0):
    return g.add("SaveImage", pos, widgets={"filename_prefix": prefix}, inputs={"images": (image, slot)}, size=size)


def common_front(g: Graph, col: Column, dit: dict = DIT):
    """Model, sampling shift, VAE, prompt, seed, empty latent."""
    unet, model = dit_chain(g, col, dit)
    vae = vae_loader(g, col)
    prompt, seed = prompt_and_seed(g, col)
    latent = g.add("EmptySD3LatentImage", col, widgets={"width": SIZE, "height": SIZE, "batch_size": 1})
    return unet, model, vae, prompt, seed, latent


# ------------------------------------------------------------------------------------------ workflows
def fix_comparison_grid(specs: dict) -> Graph:
    g = new_graph(specs, "6a0d3c51-7c1e-4e52-9d33-2f7d0a9b1c01")
    modes = list(GRID_MODES)
    note(g, "# Fix comparison grid\n\nOne prompt, one seed: the image from the stock Qwen3-4B encoder (the "
            f"reference) and one image per fix mode of the substitute encoder ({SUBSTITUTE}), composed into a "
            "labelled grid.\n\n**Fix table.** The Dimension Analyzer measures reference vs substitute over the "
            "pack's calibration corpus (empty `prompts` = fix_tables/calibration_prompts.txt) and feeds every "
            "Embedding Dimension Fix. ComfyUI caches it: it re-runs only when an encoder or one of its widgets "
            "changes, not for a new prompt. To use a saved table instead, disconnect `fix_table` and pick the "
            "file in `table_file`.\n\n**Modes.** `none`, `rescale`, `mask`, `clamp`, `full` = the original "
            "research's formulas (`rescale`, `mask` and `clamp` act about 0); `affine` = per-dim moment matching "
            "on the `content` tokens; `adapter` = the linear map the Analyzer fitted on token-aligned pairs. The "
            "Analyzer's report compares every mode on held-out prompts and names the recommended one, which mode "
            "`auto` uses.\n\n" + SAMPLING_NOTE + "\n\n**Batch.** The API twin "
            "`workflows/api/zimage_dimfix_fix_comparison_grid.json` runs over many prompts with `python -m "
            "dimfix.batch --prompt-node Prompt --prompt-input value --seed-node Seed --seed-input value ...`.",
         size=(NOTE_W, 1500))
    unet, model, vae, prompt, seed, latent = common_front(g, col(0))
    c = col(0, latent.pos[1] + latent.size[1] + GAP)
    ref = reference_clip(g, c)
    sub = substitute_clip(g, c)
    c = col(1)
    pos_ref = encode(g, ref, prompt, c, "Encode (reference)")
    pos_sub = encode(g, sub, prompt, c, "Encode (substitute)")
    neg = g.add("ConditioningZeroOut", c, title="Negative (zeroed)", inputs={"conditioning": (pos_ref, 0)})
    analyzer = g.add(NODE_IDS["analyzer"], c, title="Dimension Analyzer", widgets=ANALYZER_WIDGETS,
                     inputs={"reference": (ref, 0), "target": (sub, 0), "model": (unet, 0)})
    fixes = []
    c = col(2)
    for mode in modes:
        fixes.append(g.add(NODE_IDS["fix"], c, title=f"Fix: {mode}", widgets={**FIX_WIDGETS, "mode": mode},
                           inputs={"conditioning": (pos_sub, 0), "fix_table": (analyzer, 0)}))
    images = []
    columns = [col(3), col(4)]
    for k, cond in enumerate([pos_ref, *fixes]):
        images.append(sample_and_decode(g, columns[k // 4], model, cond, neg, latent, seed, vae,
                                        "KSampler (reference)" if k == 0 else f"KSampler ({modes[k - 1]})"))
    labels = ["Qwen3-4B (reference)", *[f"Fix: {m}" for m in modes]]
    gr = grid(g, images, labels, prompt, (5 * PITCH, 0), "Dimension Fix Comparison", columns=4, size=(560, 480))
    save(g, gr, (5 * PITCH, 480 + 30 + GAP), "zimage_dimfix/fix_grid", size=(560, 460))
    return g


#: Dimension Analyzer widgets in the bundled workflows ("" prompts = the pack's calibration corpus).
ANALYZER_WIDGETS = {"prompts": "", "layer": -2, "reference_layer": -2, "sweep_all_layers": False,
                    "outlier_ratio": 3.0, "dead_abs": 0.01, "hyper_mult": 5.0, "token_scope": "content",
                    "save_name": "", "overwrite": False}
#: Embedding Dimension Fix widgets (the mode is set per node; 0 = the table's thresholds).
FIX_WIDGETS = {"mode": BEST_MODE, "strength": 1.0, "token_scope": "content", "table_file": "none",
               "outlier_ratio": 0.0, "hyper_mult": 0.0, "clamp_sigma": 0.0}
TABLE_NAME = "qwen3-embedding-4b_vs_qwen3-4b_layer-2"


def analyze(specs: dict) -> Graph:
    g = new_graph(specs, "6a0d3c51-7c1e-4e52-9d33-2f7d0a9b1c02")
    note(g, "# Dimension analysis\n\nEncodes the calibration corpus (empty `prompts` = "
            "fix_tables/calibration_prompts.txt, one prompt per line otherwise) with the reference encoder "
            f"(Qwen3-4B) and the target ({SUBSTITUTE}) and compares every hidden dimension at layer −2.\n\n"
            "Outputs: the markdown **report** (shown by Preview Any), the **plots** (previewed on the node and "
            f"saved), and the **fix table**, saved as `models/fix_tables/{TABLE_NAME}.safetensors` for the "
            "Embedding Dimension Fix / Blend `table_file` dropdown (refresh the page to see it). A second run "
            "with the same `save_name` stops with an error unless `overwrite` is on.\n\nThe Z-Image model is "
            "optional: connected, the report adds the DiT's view (caption-embedder sensitivity). "
            "`sweep_all_layers` adds a per-layer table from the same single forward per prompt.\n\n"
            "**Other layers.** `layer` is the target's hidden layer, `reference_layer` the reference's; keep the "
            "reference at −2 (what Z-Image was trained on). For a VL encoder set `layer` to −6: the table then "
            "pairs the target at −6 with Qwen3-4B at −2, and is meant for the target's conditioning taken at −6 "
            "(Hidden Layer Select).", size=(NOTE_W, 1000))
    c = col(0)
    unet = g.add("UNETLoader", c, widgets={"unet_name": DIT["name"], "weight_dtype": "default"}, models=[DIT])
    ref = reference_clip(g, c)
    sub = substitute_clip(g, c)
    analyzer = g.add(NODE_IDS["analyzer"], (PITCH, 0), title="Dimension Analyzer",
                     widgets={**ANALYZER_WIDGETS, "save_name": TABLE_NAME},
                     inputs={"reference": (ref, 0), "target": (sub, 0), "model": (unet, 0)}, size=(400, 600))
    g.add("PreviewAny", (PITCH + 440, 0), title="Report", inputs={"source": (analyzer, 1)}, size=(520, 680))
    save(g, analyzer, c, "zimage_dimfix/analysis", size=(320, 480), slot=2)
    return g


def blend(specs: dict) -> Graph:
    g = new_graph(specs, "6a0d3c51-7c1e-4e52-9d33-2f7d0a9b1c03")
    note(g, "# Encoder ensemble (Embedding Blend)\n\n`alpha · Qwen3-4B + (1 − alpha) · substitute`, alpha 0.8 "
            "(0.7–0.9 is the usual range). The Qwen3-4B conditioning is the primary: it sets the token count; "
            "the substitute's tokens are pooled to that length and each is scaled to the RMS of the matching "
            "primary token first (`rms_match`), so alpha weighs directions, not loudness. Connect a fix table "
            "(Dimension Analyzer, or `table_file`) to treat the substitute's outlier dims (`outliers`).\n\nThe "
            "grid shows the reference image beside the blend.\n\n" + SAMPLING_NOTE,
         size=(NOTE_W, 1000))
    unet, model, vae, prompt, seed, latent = common_front(g, col(0))
    c = col(1)
    ref = reference_clip(g, c)
    sub = substitute_clip(g, c)
    pos_ref = encode(g, ref, prompt, c, "Encode (reference)")
    pos_sub = encode(g, sub, prompt, c, "Encode (substitute)")
    neg = g.add("ConditioningZeroOut", c, title="Negative (zeroed)", inputs={"conditioning": (pos_ref, 0)})
    mixed = g.add(NODE_IDS["blend"], c, title="Embedding Blend",
                  widgets={"alpha": 0.8, "align": "pool", "outliers": "none", "rms_match": True,
                           "table_file": "none"},
                  inputs={"primary": (pos_ref, 0), "secondary": (pos_sub, 0)})
    c = col(2)
    images = [sample_and_decode(g, c, model, cond, neg, latent, seed, vae, f"KSampler ({name})")
              for cond, name in [(pos_ref, "reference"), (mixed, "blend")]]
    gr = grid(g, images, ["Qwen3-4B (reference)", f"Blend α=0.8 with {SUBSTITUTE}"], prompt, (3 * PITCH, 0),
              "Embedding Blend")
    save(g, gr, (3 * PITCH, 330 + 30 + GAP), "zimage_dimfix/blend")
    return g


LAYER = -6


def layer_select(specs: dict) -> Graph:
    g = new_graph(specs, "6a0d3c51-7c1e-4e52-9d33-2f7d0a9b1c04")
    note(g, "# Other hidden layers\n\nZ-Image was trained on Qwen3-4B's `hidden_states[-2]`. Hidden Layer Select "
            f"picks another layer in Hugging Face indexing (here {LAYER}; −1 = the final normed output, 0 = the "
            "embeddings) and checks it against the model's real depth — unlike CLIP Set Last Layer, whose "
            "numbering is shifted by one and cannot reach every layer. The grid compares the default layer "
            f"with layer {LAYER} for the same seed.\n\n" + SAMPLING_NOTE, size=(NOTE_W, 1000))
    unet, model, vae, prompt, seed, latent = common_front(g, col(0))
    c = col(1)
    ref = reference_clip(g, c)
    spec = g.specs[NODE_IDS["layers"]]
    layer_widgets = {i["name"]: LAYER_WIDGETS[i["name"]] for i in spec["inputs"] if i["widget"]}
    chosen = g.add(NODE_IDS["layers"], c, title="Hidden Layer Select", widgets=layer_widgets,
                   inputs={"clip": (ref, 0)})
    pos_ref = encode(g, ref, prompt, c, "Encode (layer -2, default)")
    pos_sel = encode(g, chosen, prompt, c, f"Encode (layer {LAYER})")
    neg = g.add("ConditioningZeroOut", c, title="Negative (zeroed)", inputs={"conditioning": (pos_ref, 0)})
    c = col(2)
    images = [sample_and_decode(g, c, model, cond, neg, latent, seed, vae, f"KSampler ({name})")
              for cond, name in [(pos_ref, "layer -2"), (pos_sel, f"layer {LAYER}")]]
    gr = grid(g, images, ["Qwen3-4B layer -2 (default)", f"Qwen3-4B layer {LAYER}"], prompt, (3 * PITCH, 0),
              "Hidden layer comparison")
    save(g, gr, (3 * PITCH, 330 + 30 + GAP), "zimage_dimfix/layer")
    return g


# Z-Image Base (the undistilled model): real CFG, so the negative prompt matters and must be fixed too.
BASE_STEPS, BASE_CFG = 30, 4.0
NEGATIVE = ("blurry, low quality, lowres, jpeg artifacts, watermark, text, deformed hands, extra fingers, "
            "oversaturated, cartoon")


def base_negative(specs: dict) -> Graph:
    g = new_graph(specs, "6a0d3c51-7c1e-4e52-9d33-2f7d0a9b1c05")
    note(g, "# Z-Image Base with a fixed negative\n\nZ-Image Base (not Turbo) samples with real classifier-free "
            f"guidance (cfg {BASE_CFG:g}, {BASE_STEPS} steps; 3–5 and 25–50 are its usual ranges), so the negative "
            "prompt is read by the DiT as much as the positive. With a substitute encoder both are encoded by it, "
            "and both go through **Embedding Dimension Fix** with the same fix table (the Dimension Analyzer "
            "here, or a saved `table_file`): an unfixed negative would push the image away from a "
            "mis-scaled direction.\n\nThe grid shows the Qwen3-4B reference, the substitute unfixed, and the "
            f"substitute with positive and negative fixed (`{BEST_MODE}`, token scope `content`), same seed.\n\n"
            f"**Sampling.** `{SAMPLER}` / `{SCHEDULER}`, ModelSamplingAuraFlow shift {SHIFT:g}, {SIZE}×{SIZE}, "
            f"seed {SEED} shared by every sampler.", size=(NOTE_W, 1100), dit=DIT_BASE)
    unet, model, vae, prompt, seed, latent = common_front(g, col(0), DIT_BASE)
    c = col(0, latent.pos[1] + latent.size[1] + GAP)
    negative = g.add("PrimitiveStringMultiline", c, title="Negative prompt", widgets={"value": NEGATIVE})
    c = col(1)
    ref = reference_clip(g, c)
    sub = substitute_clip(g, c)
    analyzer = g.add(NODE_IDS["analyzer"], c, title="Dimension Analyzer", widgets=ANALYZER_WIDGETS,
                     inputs={"reference": (ref, 0), "target": (sub, 0), "model": (unet, 0)})
    c = col(2)
    conds = {}
    for clip, who in [(ref, "reference"), (sub, "substitute")]:
        for text, sign in [(prompt, "positive"), (negative, "negative")]:
            conds[who, sign] = encode(g, clip, text, c, f"Encode {sign} ({who})")
    c = col(3)
    fixed = {sign: g.add(NODE_IDS["fix"], c, title=f"Fix {sign}: {BEST_MODE}", widgets=FIX_WIDGETS,
                         inputs={"conditioning": (conds["substitute", sign], 0), "fix_table": (analyzer, 0)})
             for sign in ("positive", "negative")}
    cells = [("reference", conds["reference", "positive"], conds["reference", "negative"]),
             ("substitute, unfixed", conds["substitute", "positive"], conds["substitute", "negative"]),
             ("substitute, fixed", fixed["positive"], fixed["negative"])]
    columns = [c, col(4)]
    images = [sample_and_decode(g, columns[min(k, 1)], model, pos_c, neg_c, latent, seed, vae, f"KSampler ({name})",
                                steps=BASE_STEPS, cfg=BASE_CFG)
              for k, (name, pos_c, neg_c) in enumerate(cells)]
    labels = ["Qwen3-4B (reference)", f"{SUBSTITUTE}, unfixed", f"{SUBSTITUTE}, fixed (+ and −)"]
    gr = grid(g, images, labels, prompt, (5 * PITCH, 0), "Z-Image Base: fixed negative")
    save(g, gr, (5 * PITCH, 330 + 30 + GAP), "zimage_dimfix/base")
    return g


#: Hidden Layer Select widgets in the bundled workflow.
LAYER_WIDGETS = {"layer": LAYER}

WORKFLOW_BUILDERS = {
    "zimage_dimfix_fix_comparison_grid": fix_comparison_grid,
    "zimage_dimfix_analyze": analyze,
    "zimage_dimfix_blend": blend,
    "zimage_dimfix_layer_select": layer_select,
    "zimage_dimfix_base_negative": base_negative,
}
#: File name (without .json) of each UI workflow: the template browser shows it as the card's title and, with
#: '-' and '_' turned into spaces, as its description; the API twin keeps the script-friendly key.
UI_NAMES = {
    "zimage_dimfix_fix_comparison_grid": "Fix comparison grid",
    "zimage_dimfix_analyze": "Dimension analysis and fix table",
    "zimage_dimfix_blend": "Encoder blend",
    "zimage_dimfix_layer_select": "Hidden layer comparison",
    "zimage_dimfix_base_negative": "Z-Image Base with fixed negative",
}


def build_all(specs: dict | None = None) -> dict[str, tuple[dict, dict]]:
    """``stem -> (ui, api)`` for every bundled workflow."""
    specs = specs if specs is not None else load_specs()
    out = {}
    for stem, build in WORKFLOW_BUILDERS.items():
        g = build(specs)
        out[stem] = (g.ui(), g.api())
    return out


def write_all(dest: Path = WORKFLOWS, specs: dict | None = None) -> list[Path]:
    written = []
    for stem, (ui, api) in build_all(specs).items():
        write_json(dest / f"{UI_NAMES[stem]}.json", ui)
        write_json(dest / "api" / f"{stem}.json", api)
        written += [dest / f"{UI_NAMES[stem]}.json", dest / "api" / f"{stem}.json"]
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zdf_testkit.build_workflows", description=__doc__.split("\n")[0])
    p.add_argument("--refresh-specs", action="store_true",
                   help="re-read the node specs from a live ComfyUI (COMFYUI_PATH) with the pack loaded")
    args = p.parse_args(argv)
    if args.refresh_specs:
        from .live_comfy import refresh_specs

        refresh_specs()
    for path in write_all():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
