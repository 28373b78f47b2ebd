"""Validation study: every fix mode against the least-squares optimum on held-out tokens.

Run: ``python tests/bench/study_fixes.py`` (``--quick`` for a smaller run, ``--perf-only`` for the
timing part alone). Synthetic scenarios at realistic magnitudes (a Qwen3-4B-like per-dim σ/mean
profile with the massive dims, correlated dims through 16 shared factors, 5 % independent noise on
the target), prompts split train / held out by :func:`dimfix.pairs.is_heldout`:

- ``perdim``: per-dim defects (σ ratios log-normal, 8 high and 5 low outliers, 6 target-dead dims
  that hold a constant plus noise, mean shifts of 0.3 σ);
- ``mixed``: a near-identity linear mix that keeps per-dim σ (ratios 0.94–1.13);
- ``both``: the mix, then the per-dim defects;
- ``layout``: Z-Image token layout (constant sink and ``<|im_start|>user\\n`` prefix, content, five
  template suffix tokens) with a defective sink and per-class defects.

Every mode is scored by its held-out caption-space error (a stand-in caption embedder: RMSNorm with
a gain that damps each dim by median σ / σ_d, then a random Linear) divided by that of the
closed-form least-squares linear map (``numpy.linalg.lstsq`` on the explicit training tokens).
The performance part (a fresh process with a fixed glibc mmap threshold, so that the peak RSS is live
memory) streams 50,000 pairs at width 2560 through :class:`dimfix.adapter.AdapterFitter`, training
prompts first as the Analyzer does (wall and CPU time; peak RSS beyond the start, from a reset of the
kernel's high-water mark), and times the full adapter on [1, 300, 2560] against one float32 matmul of
that size.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _bench_util import load_core  # noqa: E402
from bench_fix import ratio as interleaved_ratio  # noqa: E402

load_core()
from dimfix import fixes  # noqa: E402
from dimfix.adapter import AdapterFitter, fit_adapters  # noqa: E402
from dimfix.dit import CapEmbedder  # noqa: E402
from dimfix.evaluate import ModeEvaluator, adapter_mode, classwise_mode, perdim_mode  # noqa: E402
from dimfix.fixtable import FixTable  # noqa: E402
from dimfix.pairs import PairSums, is_heldout  # noqa: E402
from dimfix.perclass import ClassedStats, PrefixStats, class_corrections, moment_match  # noqa: E402
from dimfix.repair import study_order  # noqa: E402
from dimfix.tokens import TokenClass, classify_positions  # noqa: E402
from zdf_testkit.profiles import near_identity_mix, qwen_like_profile, synthetic_cap_weights  # noqa: E402

SCENARIOS = ("perdim", "mixed", "both", "layout")


class Scenario:
    """Generates (target x, reference y, labels) per prompt for one scenario."""

    def __init__(self, name: str, dim: int, seed: int = 0) -> None:
        self.name, self.dim = name, dim
        g = np.random.default_rng(seed)
        self.mean, self.sigma = qwen_like_profile(dim, seed)
        self.loadings = 0.6 * g.standard_normal((dim, 16)) / 4.0
        self.mix = near_identity_mix(dim, 0.6, seed) * g.uniform(0.94, 1.13, dim)[:, None]
        scale = np.exp(0.3 * g.standard_normal(dim))
        dims = g.permutation(np.arange(10, dim))
        scale[dims[:8]] *= 5.0
        scale[dims[8:13]] *= 0.2
        scale[dims[13:19]] = 1e-4
        self.scale, self.shift = scale, 0.3 * g.standard_normal(dim)
        self.sink = self.mean + 6.0 * self.sigma * g.standard_normal(dim)
        self.sink[4] = 9000.0
        self.prefix = self.mean + self.sigma * g.standard_normal((2, dim))
        self.suffix = self.mean + self.sigma * g.standard_normal((5, dim))
        self.tmpl_scale = np.exp(0.5 * g.standard_normal(dim))

    def _z(self, g: np.random.Generator, n: int) -> np.ndarray:
        z = g.standard_normal((n, 16)) @ self.loadings.T + g.standard_normal((n, self.dim))
        return z / np.sqrt(1.0 + (self.loadings ** 2).sum(1))

    def _defect(self, z: np.ndarray, g: np.random.Generator) -> np.ndarray:
        zt = z + 0.05 * g.standard_normal(z.shape)
        if self.name in ("mixed", "both"):
            zt = zt @ self.mix.T
        if self.name in ("perdim", "both", "layout"):
            zt = zt * self.scale + self.shift
            dead = self.scale < 1e-3  # dead in the target: a constant plus noise, no information left
            zt[:, dead] = self.shift[dead] + 1e-4 * g.standard_normal((z.shape[0], int(dead.sum())))
        return zt

    def prompt(self, i: int, tokens: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        g = np.random.default_rng([i, self.dim, len(self.name)])
        z = self._z(g, tokens)
        y = self.mean + self.sigma * z
        x = self.mean + self.sigma * self._defect(z, g)
        labels = torch.full((tokens,), int(TokenClass.CONTENT), dtype=torch.int64)
        if self.name == "layout":
            zs = 0.3 * g.standard_normal((5, self.dim))
            y_suf = self.suffix + self.sigma * zs
            x_suf = self.suffix * self.tmpl_scale + self.sigma * zs
            y = np.vstack([self.sink, self.prefix, y, y_suf])
            x = np.vstack([self.sink * 0.4 + 3.0 * self.sigma, self.prefix * 1.3, x, x_suf])
            labels = classify_positions(y.shape[0])
        return x, y, labels


def _cap(sc: Scenario) -> CapEmbedder:
    gain, w, b = synthetic_cap_weights(sc.sigma, out_dim=int(1.5 * sc.dim), seed=1)
    return CapEmbedder.from_weights(*(torch.from_numpy(t) for t in (gain, w, b)))


def _collect(sc: Scenario, prompts: int, tokens: int, cap: CapEmbedder):
    data = {"train": [], "held": []}
    for i in range(prompts):
        x, y, lab = sc.prompt(i, tokens)
        data["held" if is_heldout(f"{sc.name} prompt {i}") else "train"].append(
            (torch.from_numpy(x), torch.from_numpy(y), lab))
    factor = (cap.weight * cap.gain[None, :])
    sums = {k: PairSums(sc.dim) for k in ("train", "held")}
    csums = {k: PairSums(sc.dim, metric_factor=factor) for k in ("train", "held")}
    ref, tgt = ClassedStats(sc.dim, 0), ClassedStats(sc.dim, 0)
    pre = PrefixStats(sc.dim)
    for k, items in data.items():
        for x, y, lab in items:
            sums[k].update(x, y)
            csums[k].update(x, y)
            if k == "train":
                ref.update(y, lab)
                tgt.update(x, lab)
                pre.update(y)
    return data, sums, csums, ref, tgt, pre


def _lstsq_mode(train: list) -> callable:
    x = torch.cat([t[0] for t in train]).numpy()
    y = torch.cat([t[1] for t in train]).numpy()
    coef, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)
    w, b = torch.from_numpy(coef[:-1].T.copy()), torch.from_numpy(coef[-1].copy())
    return lambda v, labels=None: v.double() @ w.T + b


def _table_modes(ref: ClassedStats, tgt: ClassedStats, layout: bool) -> dict:
    r, t = ref.scope("content"), tgt.scope("content")
    table = FixTable(r.mean, r.std(), t.mean, t.std())
    modes = {}
    for m in ("full", "affine", "mask_mean"):
        plan = fixes.plan_fix(table, m)
        modes[m] = perdim_mode(plan.scale, plan.shift)
        if layout:
            modes[m + " (content)"] = (lambda p: lambda v, labels=None: fixes.apply_scoped(
                v.float(), p, "content", labels))(plan)
    modes["moments"] = perdim_mode(*moment_match(r, t))
    return modes


def run_scenario(name: str, dim: int, prompts: int, tokens: int) -> dict[str, dict]:
    sc = Scenario(name, dim)
    cap = _cap(sc)
    data, sums, csums, ref, tgt, pre = _collect(sc, prompts, tokens, cap)
    t0 = time.perf_counter()
    fits = fit_adapters(sums["train"], sums["held"], sc.mean, sc.sigma)
    fit_s = time.perf_counter() - t0
    cfits = fit_adapters(csums["train"], csums["held"], sc.mean, sc.sigma)
    modes = {"none": perdim_mode(torch.ones(dim), torch.zeros(dim)), **_table_modes(ref, tgt, name == "layout"),
             "per_class": classwise_mode(class_corrections(ref, tgt, pre)),
             "adapter": adapter_mode(fits["adapter"]), "adapter_lowrank": adapter_mode(fits["adapter_lowrank"]),
             "adapter (caption metric)": adapter_mode(cfits["adapter"]), "least squares": _lstsq_mode(data["train"])}
    ev = ModeEvaluator(modes, torch.from_numpy(sc.mean), torch.from_numpy(sc.sigma), cap)
    for x, y, lab in data["held"]:
        ev.update(x, y, lab)
    res = {r.mode: r for r in ev.results()}
    opt = res["least squares"].caption_error
    out = {}
    for k, r in res.items():
        out[k] = {"ratio": r.caption_error / opt, "cap_cos": r.caption_cosine, "std_cos": r.standardised_cosine,
                  "cos": r.cosine, "seeds": r.seeds.passed, "verdict": r.verdict.passed}
    out["_meta"] = {"train": sum(len(t[0]) for t in data["train"]), "held": sum(len(t[0]) for t in data["held"]),
                    "rank": fits["adapter_lowrank"].rank, "alpha": fits["adapter"].alpha, "fit_s": fit_s,
                    "recommended": ModeEvaluator.recommend([r for k, r in res.items() if k != "least squares"])}
    return out


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(float(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024.0


def _peak_start() -> float:
    """Reset the peak-RSS mark (Linux: it survives fork/exec, so a parent's peak would hide this one's) and
    return the RSS it starts from, in MiB; without /proc, the high-water mark so far."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _status_mib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_mib() -> float:
    try:
        return _status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def perf(pairs: int = 50_000, dim: int = 2560, per: int = 100) -> dict[str, float]:
    """Fit time and peak RSS (MiB) beyond the start for ``pairs`` token pairs; apply cost vs one matmul."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    mean, sigma = (torch.from_numpy(a) for a in qwen_like_profile(dim))
    base = torch.randn(per, dim, generator=g)
    mix = torch.eye(dim) + 0.02 * torch.randn(dim, dim, generator=g)
    rss0 = _peak_start()
    fitter = AdapterFitter(dim, mean, sigma)
    names = [f"perf prompt {i}" for i in range(pairs // per)]
    acc = acc_cpu = 0.0
    for i in study_order(names):  # the staged fit: every training prompt, then the held-out ones
        z = base.roll(i, 0) * (1.0 + 0.01 * (i % 7)) + 0.1 * torch.randn(per, dim, generator=g)
        y = mean.float() + sigma.float() * z
        x = mean.float() + sigma.float() * (z @ mix.T)
        t0, c0 = time.perf_counter(), time.process_time()
        (fitter.add_heldout if is_heldout(names[i]) else fitter.add_train)(x, y)
        acc, acc_cpu = acc + time.perf_counter() - t0, acc_cpu + time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    fits = fitter.finish()
    fit, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_mib() - rss0
    w = fits["adapter"].weight
    xc = torch.randn(1, 300, dim)
    ratio = interleaved_ratio(lambda: fits["adapter"].apply(xc), lambda: torch.matmul(xc, w.T), repeat=40)
    return {"accumulate_s": acc, "fit_s": fit, "total_s": acc + fit, "total_cpu_s": acc_cpu + fit_cpu,
            "peak_mb": peak, "apply_ratio": ratio, "load_average": os.getloadavg()[0]}


def markdown(results: dict[str, dict]) -> str:
    modes = [m for m in next(iter(results.values())) if not m.startswith("_")]
    names = list(results)
    lines = ["| mode | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in modes:
        cells = []
        for s in names:
            r = results[s].get(m)
            mark = "" if r is None or r["verdict"] else " ✗"
            cells.append("–" if r is None else f"{r['ratio']:.2f}× ({r['cap_cos']:.4f}{mark})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    rec = " | ".join(f"{results[s]['_meta']['recommended'][0]}" for s in names)
    lines.append(f"| *recommended* | {rec} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller scenarios (width 256)")
    ap.add_argument("--perf-only", action="store_true", help="only the 50,000-pair fit and the apply cost")
    ap.add_argument("--no-perf", action="store_true", help="skip the performance part")
    args = ap.parse_args()
    if args.perf_only:
        for k, v in perf().items():
            print(f"{k}={v:.3f}")
        return
    torch.set_num_threads(2)
    dim, prompts, tokens = (256, 120, 40) if args.quick else (512, 200, 40)
    results = {s: run_scenario(s, dim, prompts, tokens) for s in SCENARIOS}
    print(f"width {dim}, {prompts} prompts × {tokens} tokens per scenario")
    for s, r in results.items():
        m = r["_meta"]
        print(f"{s}: train {m['train']} / held-out {m['held']} tokens, adapter alpha {m['alpha']:g}, "
              f"low rank {m['rank']}, fit {m['fit_s']:.2f} s, recommended {m['recommended']}")
    print()
    print("Held-out caption-space error ÷ least-squares optimum (caption-space cosine; ✗ = DiT-aware verdict fails)")
    print()
    print(markdown(results))
    if not args.no_perf:
        # a fixed mmap threshold makes freed [D, D] buffers return to the OS, so the peak RSS is live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, __file__, "--perf-only"], capture_output=True, text=True, check=True,
                             env=env)
        print()
        print(out.stdout.strip())


if __name__ == "__main__":
    main()
