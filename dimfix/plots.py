"""Analysis figures as RGB arrays (uint8 ``[H, W, 3]``), for ComfyUI IMAGE outputs and reports.

matplotlib is imported inside the functions only, with the object API (``Figure`` + ``FigureCanvasAgg``):
no pyplot, no global state, thread-safe, Agg backend whatever the user's configuration. Every figure is
``size`` pixels (default 1024 × 640 at dpi 100) exactly: no tight bounding box.

Inputs are plain tensors / arrays. Non-finite values (NaN, ±Inf) and values that a log axis cannot show
(σ ≤ 0) are left out of the plot and counted in the title, never raise, and produce no warnings.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_SIZE",
    "ratio_histogram",
    "sigma_scatter",
    "top_outlier_bars",
    "class_counts",
    "layer_heatmap",
    "analysis_figures",
    "to_image_batch",
]

#: Width, height in pixels of every figure (dpi 100).
DEFAULT_SIZE = (1024, 640)
_DPI = 100
_HIGH = "#d62728"
_LOW = "#1f77b4"
_GREY = "#9a9a9a"
#: Heatmaps wider than this many dims are max-pooled over bins of dims.
_MAX_HEATMAP_COLUMNS = 320


def _vector(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim > 1:
        arr = arr.squeeze()  # [1, D] / [D, 1] are accepted
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D vector [D], got shape {tuple(arr.shape)}")
    return arr


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 1.0):
        raise ValueError(f"tau must be a finite ratio > 1 (e.g. 3.0), got {tau}")
    return tau


def _figure(size: tuple[int, int]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = int(size[0]), int(size[1])
    if w < 64 or h < 64:
        raise ValueError(f"size must be at least 64 × 64 pixels, got {size}")
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _render(fig: Any) -> np.ndarray:
    canvas = fig.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, :3])


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=14, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _dropped(n: int, what: str) -> str:
    return f" ({n} {what} not shown)" if n else ""


def ratio_histogram(log10_ratio: Any, tau: float = 3.0,
                    title: str = "Per-dimension std ratio  log10(σ_target / σ_reference)",
                    size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Histogram of ``log10(σ_tgt/σ_ref)`` per dim, dashed lines at ±log10 τ, counts beyond each in the legend.

    The count axis is logarithmic so that a handful of outliers stays visible next to thousands of dims.
    """
    tau = _check_tau(tau)
    r = _vector(log10_ratio, "log10_ratio")
    finite = r[np.isfinite(r)]
    lim = math.log10(tau)
    n_hi, n_lo = int((finite > lim).sum()), int((finite < -lim).sum())
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title + _dropped(r.size - finite.size, "non-finite"), fontsize=12)
    if finite.size == 0:
        _empty_note(ax, "no finite ratios to show")
        return _render(fig)
    lo, hi = min(finite.min(), -lim) - 0.1, max(finite.max(), lim) + 0.1
    bins = np.linspace(lo, hi, int(np.clip(np.sqrt(finite.size) * 2, 20, 120)) + 1)
    ax.hist(finite, bins=bins, color="#6b8fb5", edgecolor="white", linewidth=0.3)
    ax.set_yscale("log", nonpositive="clip")
    ax.set_ylim(bottom=0.7)
    ax.axvline(lim, color=_HIGH, linestyle="--", linewidth=1.5,
               label=f"> {tau:g}×  : {n_hi} dims")
    ax.axvline(-lim, color=_LOW, linestyle="--", linewidth=1.5,
               label=f"< 1/{tau:g}× : {n_lo} dims")
    ax.axvline(0.0, color="#444444", linewidth=0.8)
    ax.set_xlabel("log10(σ_target / σ_reference)")
    ax.set_ylabel("dims (log scale)")
    ax.legend(loc="upper right", title=f"{finite.size} dims, median {np.median(finite):+.3f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _render(fig)


def sigma_scatter(sigma_ref: Any, sigma_tgt: Any, tau: float = 3.0, top_k: int = 10,
                  title: str = "Per-dimension σ: target vs reference",
                  size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Log–log scatter of σ_tgt vs σ_ref with y = x, y = τx, y = x/τ; outliers coloured, top-k labelled."""
    tau = _check_tau(tau)
    ref, tgt = _vector(sigma_ref, "sigma_ref"), _vector(sigma_tgt, "sigma_tgt")
    if ref.shape != tgt.shape:
        raise ValueError(f"sigma_ref and sigma_tgt must have the same length, got {ref.size} and {tgt.size}")
    ok = np.isfinite(ref) & np.isfinite(tgt) & (ref > 0) & (tgt > 0)
    dims = np.flatnonzero(ok)
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title + _dropped(int((~ok).sum()), "dims with σ ≤ 0 or non-finite"), fontsize=12)
    if dims.size == 0:
        _empty_note(ax, "no positive finite σ pairs to show")
        return _render(fig)
    x, y = ref[ok], tgt[ok]
    lr = np.log10(y / x)
    lim = math.log10(tau)
    hi, lo = lr > lim, lr < -lim
    mid = ~(hi | lo)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.scatter(x[mid], y[mid], s=6, c=_GREY, alpha=0.6, linewidths=0, label=f"within τ={tau:g}: {int(mid.sum())}")
    ax.scatter(x[hi], y[hi], s=16, c=_HIGH, linewidths=0, label=f"σ_tgt > {tau:g}·σ_ref: {int(hi.sum())}")
    ax.scatter(x[lo], y[lo], s=16, c=_LOW, linewidths=0, label=f"σ_tgt < σ_ref/{tau:g}: {int(lo.sum())}")
    vmin = float(min(x.min(), y.min())) / 1.5
    vmax = float(max(x.max(), y.max())) * 1.5
    line = np.array([vmin, vmax])
    ax.plot(line, line, color="black", linewidth=1, label="y = x")
    ax.plot(line, line * tau, color=_HIGH, linestyle="--", linewidth=1, label=f"y = {tau:g}x")
    ax.plot(line, line / tau, color=_LOW, linestyle="--", linewidth=1, label=f"y = x/{tau:g}")
    ax.set_xlim(vmin, vmax)
    ax.set_ylim(vmin, vmax)
    k = int(max(0, min(top_k, dims.size)))
    if k:
        order = np.argsort(-np.abs(lr), kind="stable")[:k]
        for j in order:
            ax.annotate(f"dim {int(dims[j])}", (x[j], y[j]), xytext=(4, 4), textcoords="offset points",
                        fontsize=8, color="#222222")
    ax.set_xlabel("σ reference (log)")
    ax.set_ylabel("σ target (log)")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _render(fig)


def top_outlier_bars(ratio: Any, n: int = 10, tau: float = 3.0,
                     title: str = "Most different dimensions (σ_target / σ_reference)",
                     size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Horizontal bars of the ``n`` highest and ``n`` lowest ratios (log axis), dashed lines at τ and 1/τ."""
    tau = _check_tau(tau)
    r = _vector(ratio, "ratio")
    ok = np.isfinite(r) & (r > 0)
    dims = np.flatnonzero(ok)
    vals = r[ok]
    fig = _figure(size)
    fig.suptitle(title + _dropped(int((~ok).sum()), "ratios ≤ 0 or non-finite"), fontsize=12)
    if dims.size == 0:
        _empty_note(fig.add_subplot(1, 1, 1), "no positive finite ratios to show")
        return _render(fig)
    n = int(max(1, min(n, dims.size)))
    order = np.argsort(vals, kind="stable")
    panels = [("highest", order[::-1][:n], _HIGH), ("lowest", order[:n], _LOW)]
    lo_v, hi_v = min(vals.min(), 1 / tau) / 2.0, max(vals.max(), tau) * 2.0
    for p, (name, idx, colour) in enumerate(panels):
        ax = fig.add_subplot(1, 2, p + 1)
        ypos = np.arange(idx.size)[::-1]
        ax.set_xscale("log")
        ax.barh(ypos, vals[idx] - 1.0, left=1.0, height=0.7, color=colour, alpha=0.85)  # bars start at 1×
        ax.set_yticks(ypos)
        ax.set_yticklabels([f"dim {int(dims[i])}" for i in idx], fontsize=9)
        for yy, i in zip(ypos, idx):
            above = vals[i] >= 1.0
            ax.text(vals[i], yy, f" {vals[i]:.3g} ", va="center", ha="left" if above else "right", fontsize=8)
        ax.axvline(tau, color=_HIGH, linestyle="--", linewidth=1.2, label=f"{tau:g}×")
        ax.axvline(1 / tau, color=_LOW, linestyle="--", linewidth=1.2, label=f"1/{tau:g}×")
        ax.axvline(1.0, color="#444444", linewidth=0.8)
        ax.set_xlim(lo_v, hi_v)
        ax.set_ylim(-0.8, idx.size - 0.2)
        ax.set_title(f"{name} {idx.size}", fontsize=11)
        ax.set_xlabel("ratio (log)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3, axis="x", which="both")
    fig.tight_layout()
    return _render(fig)


def class_counts(counts: Mapping[str, Sequence[int]], labels: Sequence[str] = ("reference", "target"),
                 title: str = "Dimension classes", size: tuple[int, int] = DEFAULT_SIZE,
                 ylabel: str = "dims") -> np.ndarray:
    """Grouped bars: one group per class name (outlier high, outlier low, dead, hyperactive, ...);
    ``ylabel`` names what is counted (``"dims"``, or ``"tokens"`` for token classes)."""
    names = list(counts)
    labels = list(labels)
    rows = []
    for name in names:
        vals = list(counts[name])
        if len(vals) != len(labels):
            raise ValueError(f"class_counts[{name!r}]: expected {len(labels)} counts ({', '.join(labels)}), "
                             f"got {len(vals)}")
        rows.append([float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in vals])
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=12)
    if not names:
        _empty_note(ax, "no classes to show")
        return _render(fig)
    data = np.array(rows)
    m = len(labels)
    width = 0.8 / m
    x = np.arange(len(names))
    colours = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    for j, lab in enumerate(labels):
        pos = x - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, data[:, j], width=width * 0.95, color=colours[j % len(colours)], label=lab)
        for b, v in zip(bars, data[:, j]):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{int(v)}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, float(data.max())) * 1.15)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _render(fig)


def layer_heatmap(std: Any, layer_labels: Sequence[str] | None = None,
                  highlight_dims: Sequence[int] = (0, 4, 100, 396),
                  title: str = "Per-dimension std by layer  (log10(σ + 1))",
                  size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Heatmap of ``log10(σ + 1)`` for a layer sweep ``std [L, D]`` (viridis), colourbar, dims highlighted."""
    if hasattr(std, "detach"):
        std = std.detach().cpu().double().numpy()
    s = np.asarray(std, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"std: expected a non-empty [layers, dims] array, got shape {tuple(s.shape)}")
    n_layers, n_dims = s.shape
    if layer_labels is None:
        layer_labels = [str(i) for i in range(n_layers)]
    layer_labels = [str(v) for v in layer_labels]
    if len(layer_labels) != n_layers:
        raise ValueError(f"layer_labels: expected {n_layers} labels (one per row of std), got {len(layer_labels)}")
    bad = ~np.isfinite(s)
    with np.errstate(invalid="ignore"):
        z = np.log10(np.clip(np.where(bad, 0.0, s), 0.0, None) + 1.0)
    z = np.where(bad, np.nan, z)
    pool = max(1, math.ceil(n_dims / _MAX_HEATMAP_COLUMNS))
    if pool > 1:  # max over bins of dims: a single massive dim stays visible after downsampling
        cols = math.ceil(n_dims / pool)
        padded = np.full((n_layers, cols * pool), np.nan)
        padded[:, :n_dims] = z
        blocks = padded.reshape(n_layers, cols, pool)
        all_nan = np.isnan(blocks).all(axis=2)
        z = np.where(all_nan, np.nan, np.nanmax(np.where(np.isnan(blocks), -np.inf, blocks), axis=2))
    else:
        cols = n_dims
    z = np.ma.masked_invalid(z)
    fig = _figure(size)
    ax = fig.add_subplot(1, 1, 1)
    note = f", max over bins of {pool} dims" if pool > 1 else ""
    ax.set_title(title + note + _dropped(int(bad.sum()), "non-finite cells"), fontsize=12, pad=16)
    im = ax.imshow(z, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(-0.5, cols * pool - 0.5, n_layers - 0.5, -0.5))
    ax.set_xlim(-0.5, n_dims - 0.5)
    fig.colorbar(im, ax=ax, label="log10(σ + 1)")
    shown = sorted({int(d) for d in highlight_dims if 0 <= int(d) < n_dims})
    groups: list[list[int]] = []
    for d in shown:  # dims closer than 1/40 of the axis share one label
        if groups and d - groups[-1][-1] < n_dims / 40:
            groups[-1].append(d)
        else:
            groups.append([d])
    for group in groups:
        for d in group:
            ax.axvline(d, color="red", linestyle="--", linewidth=0.6, alpha=0.35)
            ax.plot([d], [-0.5], marker="v", color="red", markersize=5, clip_on=False)
        ax.text(group[0], -0.5, " " + ",".join(str(d) for d in group), color="red", fontsize=8,
                va="bottom", ha="left")
    step = max(1, math.ceil(n_layers / 24))
    ticks = list(range(0, n_layers, step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([layer_labels[i] for i in ticks], fontsize=8)
    ax.set_xlabel("dimension")
    ax.set_ylabel("layer")
    fig.tight_layout()
    return _render(fig)


def analysis_figures(result: Any) -> list[np.ndarray]:
    """The figures of an :class:`~dimfix.result.AnalysisResult` (uint8 RGB ``[H, W, 3]``): ratio histogram,
    σ scatter, top outliers, dimension and token classes, and for sweeps a layer × dim heatmap of the
    target's σ."""
    from .report import pair_label, short

    res = result.result()
    c = res.comparison
    tau = result.thresholds.outlier_ratio
    where = pair_label(res.layer, res.reference_layer)
    models = (short(result.reference_model, 30), short(result.target_model, 30))
    counts = result.class_counts
    images = [
        ratio_histogram(np.log10(_vector(c.ratio, "ratio")), tau=tau,
                        title=f"log10(σ_target / σ_reference), {where}, {result.token_scope} tokens"),
        sigma_scatter(c.sigma_ref, c.sigma_tgt, tau=tau,
                      title=f"Per-dimension σ: {models[1]} vs {models[0]} ({where})"),
        top_outlier_bars(c.ratio, n=10, tau=tau),
        class_counts({"dead": [len(c.dead_ref), len(c.dead_tgt)], "hyperactive": [len(c.hyper_ref), len(c.hyper_tgt)]},
                     labels=models, title="Dimension classes"),
        class_counts({k: [counts["reference"][k], counts["target"][k]] for k in counts["reference"]},
                     labels=models, title="Tokens per class", ylabel="tokens"),
    ]
    if result.is_sweep:
        std = np.stack([_vector(result.results[k].comparison.sigma_tgt, "sigma_tgt") for k in result.layers])
        title = f"Target per-dimension σ by layer (log10(σ + 1)), {result.token_scope} tokens"
        images.append(layer_heatmap(std, [str(k) for k in result.layers], title=title))
    return images


def to_image_batch(arrays: Sequence[np.ndarray]) -> Any:
    """uint8 / float RGB arrays → ComfyUI IMAGE batch: float32 torch ``[B, H, W, 3]`` in 0..1.

    ComfyUI batches need one size: smaller images are placed top-left and padded with white to the
    largest height and width.
    """
    import torch

    if len(arrays) == 0:
        raise ValueError("to_image_batch: no images given")
    imgs = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"to_image_batch: arrays[{i}] must be [H, W, 3], got shape {tuple(a.shape)}")
        a = a[:, :, :3]
        if a.dtype == np.uint8:
            f = a.astype(np.float32) / 255.0
        else:
            f = np.clip(np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        imgs.append(f)
    h = max(a.shape[0] for a in imgs)
    w = max(a.shape[1] for a in imgs)
    out = np.ones((len(imgs), h, w, 3), dtype=np.float32)
    for i, a in enumerate(imgs):
        out[i, :a.shape[0], :a.shape[1]] = a
    return torch.from_numpy(out)
