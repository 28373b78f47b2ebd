"""Pure core of Z-Image DimFix: no ComfyUI import anywhere in this package.

Modules (import the ones you need; ``plots`` imports matplotlib lazily):

- ``tokens``      Z-Image chat template and token classes (sink / template / content)
- ``config``      thresholds shared by analysis, fixes and blending
- ``rules``       the per-dimension rules, each once: median, std ratio + epsilon, dead, hyperactive, outlier
- ``stats``       streaming, mergeable float64 per-dimension moments and percentiles
- ``compare``     reference-vs-target comparison, classes and verdict
- ``safetensors_header`` the one safetensors header parser (checkpoints and fix tables)
- ``fixtable``    the fix-table safetensors format (atomic, validated)
- ``conditioning`` validation and copy-on-write mapping of ComfyUI CONDITIONING lists
- ``corpus``      the calibration prompt corpus and its parsing rules
- ``fixes``       fix modes applied to [..., T, D] tensors
- ``blend``       length alignment and mixing of two sequences
- ``checkpoint``  Qwen3 checkpoint reader (single file, HF folder, shards, flat keys)
- ``layers``      Hugging Face hidden-state index <-> ComfyUI ``clip_layer`` mapping
- ``dit``         DiT-aware sensitivity from the caption embedder weights
- ``analysis``    corpus analysis: streaming accumulation per prompt, conditioning pairs
- ``result``      the analysis result: layer results, verdict, layer recommendation, fix table
- ``report``      the analysis' markdown report
- ``plots``       matplotlib figures as RGB arrays (and the analysis' figures)
- ``grid``        labelled comparison grid
- ``batch``       ComfyUI HTTP API batch runner (``python -m dimfix.batch``)
"""

__all__ = [
    "analysis", "batch", "blend", "checkpoint", "compare", "conditioning", "config", "corpus", "dit",
    "fixes", "fixtable", "grid", "layers", "plots", "report", "result", "rules", "safetensors_header", "stats",
    "tokens",
]
