"""Benchmark: 30 prompts on 3 equal-speed stub ComfyUI servers vs 1 (target: wall time ≤ 0.4 × one server's).

Run: ``python tests/bench/bench_batch.py [--seconds 0.2] [--prompts 30]``. Each stub (127.0.0.1) runs its
queue in order and takes ``--seconds`` per prompt, like a GPU that does one prompt at a time; the runner
dispatches by shortest queue with websocket progress. Prints ``three_vs_one_ratio=...`` and the prompts
each server ran.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _bench_util import load_core  # noqa: E402

load_core()
from dimfix.batch import ComfyClient, run_batch  # noqa: E402
from zdf_testkit.comfy_stub import StubComfy  # noqa: E402

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 4, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}, "_meta": {"title": "Prompt"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}


def wall_time(n_servers: int, prompts: list[str], seconds: float) -> tuple[float, list[int]]:
    stubs = [StubComfy(run_seconds=seconds, steps=4) for _ in range(n_servers)]
    try:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            res = run_batch([ComfyClient(s.url) for s in stubs], GRAPH, prompts, "Prompt", seed_selector="3",
                            seed=1, out_dir=out, poll_interval=0.05)
            elapsed = time.perf_counter() - t0
        bad = [r for r in res if r.status != "ok"]
        if bad:
            raise SystemExit(f"{len(bad)} prompt(s) failed: {bad[0].error}")
        return elapsed, [len(s.queued) for s in stubs]
    finally:
        for s in stubs:
            s.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=0.2, help="per-prompt run time of a stub server")
    p.add_argument("--prompts", type=int, default=30)
    args = p.parse_args()
    prompts = [f"benchmark prompt {i}" for i in range(args.prompts)]
    one, _ = wall_time(1, prompts, args.seconds)
    three, split = wall_time(3, prompts, args.seconds)
    ideal = args.prompts * args.seconds
    print(f"one_server_s={one:.2f} (ideal {ideal:.2f}) three_servers_s={three:.2f} (ideal {ideal / 3:.2f}) "
          f"prompts_per_server={split}")
    print(f"three_vs_one_ratio={three / one:.3f} (target <= 0.4)")


if __name__ == "__main__":
    main()
