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
- ``pairs``       token-aligned (target, reference) pairs: alignment, prompt split, streaming pair sums
- ``adapter``     learned linear corrections (``adapter``, ``adapter_lowrank``) fitted from pair sums
- ``perclass``    per-token-class statistics and dead-dim-safe corrections, constant prefix vectors
- ``diagnostics`` shape and mixed dims, standardised / caption-space similarity, the DiT-aware verdict
- ``evaluate``    held-out evaluation of every fix mode and the recommended mode
- ``repair``      the analysis' repair study: fits, evaluates and stores the learned and per-class modes
"""

__all__ = [
    "adapter", "analysis", "batch", "blend", "checkpoint", "compare", "conditioning", "config", "corpus",
    "diagnostics", "dit", "evaluate", "fixes", "fixtable", "grid", "layers", "pairs", "perclass", "plots", "repair",
    "report", "result", "rules", "safetensors_header", "stats", "tokens",
]
