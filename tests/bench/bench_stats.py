"""Benchmark: DimStats throughput vs scipy.stats on a 100k × 2560 token matrix (target ≥ 2×).

Run: ``python tests/bench/bench_stats.py [--tokens 100000] [--dims 2560] [--repeat 2]``.

- ``dimfix``: ``DimStats.update`` on float32 input (upcast to float64 inside, in chunks) + mean,
  std, skewness and kurtosis (both bias settings) + percentiles (0.1, 1, 50, 99, 99.9) from the
  bounded row sample (the approximate path: 100k tokens > 4096 kept rows).
- ``scipy``: two baselines on the same data already converted to float64 (conversion not timed),
  neither computing percentiles: ``scipy.stats.describe`` (mean, variance, skewness, kurtosis,
  min/max), and a lean set (``numpy`` mean/std/min/max + ``scipy.stats.skew`` + ``kurtosis``).

Prints the best wall times and ``stats_vs_scipy_ratio=<faster scipy baseline / dimfix>x`` plus
the largest difference of the moments from scipy's (sanity check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_util import best_of, load_core  # noqa: E402

load_core()
from dimfix.stats import DimStats  # noqa: E402


def make_tokens(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Qwen3-like float32 tokens: most dims σ≈5, a few massive dims, sink spikes every 30 tokens."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.full((d,), 5.6)
    mean = torch.zeros(d)
    for dim, s, m in ((4, 2752.6, 924.9), (396, 948.7, -300.0), (0, 193.4, 232.8), (100, 77.2, 10.0)):
        if dim < d:
            sigma[dim], mean[dim] = s, m
    x = torch.randn(n, d, generator=g)
    x.mul_(sigma).add_(mean)
    if d > 4:
        x[::30, 4] = 13504.0
    return x


def dimfix_stats(x: torch.Tensor) -> dict:
    st = DimStats(x.shape[-1])
    st.update(x)
    return {"mean": st.mean, "std": st.std(), "skew": st.skewness(), "kurt": st.kurtosis(),
            "skew_unbiased": st.skewness(bias=False), "kurt_unbiased": st.kurtosis(bias=False),
            "pct": st.percentiles(), "min": st.minimum(), "max": st.maximum()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=2560)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    x = make_tokens(args.tokens, args.dims)
    x64 = x.numpy().astype(np.float64)
    print(f"data: {args.tokens} tokens x {args.dims} dims float32, torch threads={torch.get_num_threads()}")

    out = {}
    t_ours = best_of(lambda: out.update(dimfix_stats(x)), args.repeat)
    res = {}
    t_scipy = best_of(lambda: res.update(d=scipy.stats.describe(x64, axis=0)), max(1, args.repeat - 1))
    t_lean = best_of(lambda: (x64.mean(0), x64.std(0, ddof=1), x64.min(0), x64.max(0),
                              scipy.stats.skew(x64, axis=0), scipy.stats.kurtosis(x64, axis=0)),
                     max(1, args.repeat - 1))
    d = res["d"]
    diffs = {
        "mean": np.max(np.abs(out["mean"].numpy() - d.mean) / np.abs(d.mean).clip(1e-12)),
        "var": np.max(np.abs(out["std"].numpy() ** 2 / d.variance - 1)),
        "skew": np.max(np.abs(out["skew"].numpy() - d.skewness)),
        "kurt": np.max(np.abs(out["kurt"].numpy() - d.kurtosis)),
    }
    print(f"dimfix DimStats.update + moments + percentiles: {t_ours:.3f} s "
          f"({args.tokens * args.dims / t_ours / 1e6:.0f} M values/s)")
    print(f"scipy.stats.describe (float64, no percentiles): {t_scipy:.3f} s")
    print("max difference vs scipy: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    print(f"numpy mean/std/min/max + scipy.stats.skew/kurtosis (float64): {t_lean:.3f} s")
    print(f"stats_vs_scipy_ratio={min(t_scipy, t_lean) / t_ours:.1f}x (target >= 2x; "
          f"vs describe {t_scipy / t_ours:.1f}x, vs lean {t_lean / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
