"""Benchmark: Qwen3 Embedding Loader vs ComfyUI's stock text-encoder loader (load time, peak RSS).

Run: ``COMFYUI_PATH=<ComfyUI 0.8 tree> python tests/bench/bench_loader.py [--layers 8] [--repeats 2] [--keep DIR]``
with an interpreter that has ComfyUI's requirements. Prints ``load_time_ratio=…`` and ``peak_rss_ratio=…``
(pack / stock; target ≤ 1.05).

The checkpoint: one bf16 ``.safetensors`` file with Qwen3-4B shapes (width 2560, 32/8 heads, FFN 9728,
vocab 151936 — ComfyUI detects Qwen3-4B only at width 2560 and its stock config needs exactly these
shapes) but only ``--layers`` blocks (default 8: 0.78 GB embedding + 8 × 0.20 GB ≈ 2.4 GB, instead of
8 GB for all 36). Stock detection always builds the 36-block config, so the stock side is given the same
depth through ``comfy.sd.load_clip(..., model_options={"qwen3_4b_model_config": {"num_hidden_layers": N}})``
— otherwise it would allocate 28 extra, never-loaded blocks and the comparison would not be like for like.
Stock = ``comfy.sd.load_clip([file], clip_type=LUMINA2)`` (what ``CLIPLoader`` calls); pack = the node's
``execute`` (read + validate + fingerprint + build). Each load runs in a fresh subprocess; peak RSS is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process (ComfyUI's imports included, reported too).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
PACK_MODULE = "custom_nodes_x_zimage_dimfix"


def make_checkpoint(path: Path, layers: int, seed: int = 0) -> None:
    """Random bf16 Qwen3-4B-shaped weights with ``layers`` blocks, ComfyUI key layout."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, inter, q, kv, vocab = 2560, 9728, 32 * 128, 8 * 128, 151936

    def rnd(*shape, std=0.02):
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=g)

    sd = {"model.embed_tokens.weight": rnd(vocab, h, std=1.0), "model.norm.weight": rnd(h, std=0.1) + 1}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": rnd(h, std=0.1) + 1,
                   p + "post_attention_layernorm.weight": rnd(h, std=0.1) + 1,
                   p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                   p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                   p + "self_attn.q_norm.weight": rnd(128, std=0.1) + 1,
                   p + "self_attn.k_norm.weight": rnd(128, std=0.1) + 1,
                   p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                   p + "mlp.down_proj.weight": rnd(h, inter)})
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(kind: str, file: Path, layers: int) -> None:
    """Runs in a fresh process: import ComfyUI, load once, print a JSON line."""
    sys.path.insert(0, str(Path(os.environ["COMFYUI_PATH"]).resolve()))
    sys.path.insert(0, str(TESTS))
    from zdf_testkit.host_env import ensure_standins

    ensure_standins()
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import comfy.sd
    import folder_paths

    folder_paths.folder_names_and_paths["text_encoders"] = ([str(file.parent)], {".safetensors"})
    if kind == "pack":
        spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
        loader = importlib.import_module(PACK_MODULE + ".nodes.loader").Qwen3EmbeddingLoader
    base = _rss_kb()
    t0 = time.perf_counter()
    if kind == "pack":
        clip = loader.execute(model_name=file.name, dtype="default", append_eos=False, analysis_only=True).args[0]
    else:
        clip = comfy.sd.load_clip([str(file)], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=comfy.sd.CLIPType.LUMINA2,
                                  model_options={"qwen3_4b_model_config": {"num_hidden_layers": layers}})
    seconds = time.perf_counter() - t0
    depth = clip.cond_stage_model.qwen3_4b.num_layers
    print(json.dumps({"kind": kind, "load_s": seconds, "base_rss_kb": base, "peak_rss_kb": _rss_kb(), "depth": depth}))


def run_child(kind: str, file: Path, layers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--file", str(file), "--layers", str(layers)],
                         capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{kind} load failed (rc={out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    result = json.loads(lines[-1])
    if result["depth"] != layers:
        raise SystemExit(f"{kind} built {result['depth']} blocks instead of {layers}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="transformer blocks in the benchmark checkpoint")
    ap.add_argument("--repeats", type=int, default=2, help="loads per loader (alternating); medians are reported")
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep (and reuse) the checkpoint in")
    ap.add_argument("--child", choices=("pack", "stock", "make"), help=argparse.SUPPRESS)
    ap.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("bench_loader needs a ComfyUI 0.8 source tree: set COMFYUI_PATH and run with an interpreter "
                         "that has ComfyUI's requirements installed")
    if a.child == "make":
        make_checkpoint(a.file, a.layers)
        return
    if a.child:
        child(a.child, a.file, a.layers)
        return
    tmp = None
    folder = a.keep
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        folder = Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"qwen3_4b_shapes_{a.layers}layers_bf16.safetensors"
    try:
        if not file.is_file():
            t0 = time.perf_counter()
            # In a subprocess: Linux keeps ru_maxrss across fork/exec, so a large parent would inflate the
            # children's peaks.
            subprocess.run([sys.executable, __file__, "--child", "make", "--file", str(file), "--layers",
                            str(a.layers)], check=True)
            print(f"checkpoint: {file.name} {file.stat().st_size / 1e9:.2f} GB, made in {time.perf_counter() - t0:.1f} s")
        else:
            print(f"checkpoint: {file.name} {file.stat().st_size / 1e9:.2f} GB (reused)")
        runs: dict[str, list[dict]] = {"stock": [], "pack": []}
        for _ in range(a.repeats):
            for kind in ("stock", "pack"):
                r = run_child(kind, file, a.layers)
                runs[kind].append(r)
                print(f"  {kind:5s} load {r['load_s']:.2f} s, peak RSS {r['peak_rss_kb'] / 1e6:.2f} GB "
                      f"(after imports {r['base_rss_kb'] / 1e6:.2f} GB)")
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("load_s", "peak_rss_kb", "base_rss_kb")}
               for k, v in runs.items()}
        for k in ("stock", "pack"):
            print(f"{k}: load_s={med[k]['load_s']:.3f} peak_rss_gb={med[k]['peak_rss_kb'] / 1e6:.3f} "
                  f"load_rss_gb={(med[k]['peak_rss_kb'] - med[k]['base_rss_kb']) / 1e6:.3f}")
        print(f"load_time_ratio={med['pack']['load_s'] / med['stock']['load_s']:.3f}")
        print(f"peak_rss_ratio={med['pack']['peak_rss_kb'] / med['stock']['peak_rss_kb']:.3f}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
