"""Synthetic hidden-state magnitudes shaped like Qwen3-4B layer -2 (no data file needed).

``qwen_like_profile(dim)`` gives per-dim (mean, σ): σ log-normal about a median of 5.6 with a floor of
3.5, plus massive dims (4: σ 2752 / mean 925, 396: 949, 0: 193 / mean 233, 100: 77, 9: 36) when the
width allows; means are N(0, 3) elsewhere. ``load_profile(path)`` reads the real statistics file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MASSIVE = {4: (925.0, 2752.0), 396: (-40.0, 949.0), 0: (233.0, 193.0), 100: (12.0, 77.0), 9: (-5.0, 36.0)}


def qwen_like_profile(dim: int = 2560, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    sigma = np.maximum(5.6 * np.exp(0.25 * g.standard_normal(dim)), 3.5)
    mean = 3.0 * g.standard_normal(dim)
    for d, (m, s) in MASSIVE.items():
        if d < dim:
            mean[d], sigma[d] = m, s
    return mean, sigma


def load_profile(path: Path) -> tuple[np.ndarray, np.ndarray]:
    z = np.load(path)
    return z["per_dim_mean"].astype(np.float64), z["per_dim_std"].astype(np.float64)


def near_identity_mix(dim: int, strength: float = 0.35, seed: int = 0) -> np.ndarray:
    """``[dim, dim]`` near-identity mixing with unit-norm rows (each dim keeps its σ for whitened
    inputs); the massive dims are left unmixed, as the global cosine of real substitutes suggests."""
    g = np.random.default_rng(seed)
    mix = np.eye(dim) + strength * g.standard_normal((dim, dim)) / np.sqrt(dim)
    for d in MASSIVE:
        if d < dim:
            mix[d, :] = 0.0
            mix[:, d] = 0.0
            mix[d, d] = 1.0
    return mix / np.linalg.norm(mix, axis=1, keepdims=True)


def synthetic_cap_weights(sigma: np.ndarray, out_dim: int = 96, seed: int = 0):
    """``(gain [D], weight [out, D], bias [out])`` of a stand-in caption embedder (RMSNorm + Linear)
    whose gain damps each dim by ``median σ / σ_d`` (times U(0.5, 1.5)), so that no dim dominates the
    caption features: an assumption about the trained weights, which are not available here."""
    g = np.random.default_rng(seed)
    dim = sigma.size
    gain = np.median(sigma) / sigma * g.uniform(0.5, 1.5, dim)
    weight = g.standard_normal((out_dim, dim)) / np.sqrt(dim)
    return gain, weight, 0.1 * g.standard_normal(out_dim)
