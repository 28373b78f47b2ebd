"""End to end over HTTP: a real ComfyUI server runs the bundled workflows' API twins with tiny models.

The server gets a temporary base directory with the pack (copied) and the TEST-ONLY detection-patch
node in ``custom_nodes/``, tiny random models in ``models/``, and an empty front-end folder. The fix
comparison grid runs over two prompts through ``dimfix.batch.run_batch``; the blend and layer-select
workflows through the ``python -m dimfix.batch`` command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from zdf_testkit import tiny_zimage as tz
from zdf_testkit.build_workflows import UI_NAMES
from zdf_testkit.host_env import server_env
from zdf_testkit.live_comfy import PACK_FOLDER, install_pack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "workflows" / "api"
SIZE, STEPS = 64, 2
CAL_PROMPTS = "a red fox in the snow\nan old lighthouse at dusk\nmacro photo of a dew drop\na busy street market"
PROMPTS = ["A cat sleeping in sunlight", "A mountain landscape at sunset"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_graph(stem: str, names: dict) -> dict:
    """The shipped API twin with tiny model names, a 64×64 latent, 2 steps and a short analysis corpus."""
    g = json.loads((API / f"{stem}.json").read_text(encoding="utf-8"))
    for node in g.values():
        i, cls = node["inputs"], node["class_type"]
        if cls == "UNETLoader":
            i["unet_name"] = names["dit"]
        elif cls == "CLIPLoader":
            i["clip_name"] = names["te"]
        elif cls == "VAELoader":
            i["vae_name"] = names["vae"]
        elif cls == "DimFixQwen3EmbeddingLoader":
            i["model_name"] = names["substitute"]
            i["analysis_only"] = True  # the tiny test encoders are 64 wide
        elif cls == "EmptySD3LatentImage":
            i["width"] = i["height"] = SIZE
        elif cls == "KSampler":
            i["steps"] = STEPS
        elif cls == "DimFixDimensionAnalyzer":
            i["prompts"] = CAL_PROMPTS
    return g


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI server on a free port; yields (url, base, models, log path); stopped afterwards."""
    base = tmp_path_factory.mktemp("e2e_base")
    custom = base / "custom_nodes"
    install_pack(custom, PACK_FOLDER)
    tz.install_test_patch_node(custom)
    models = tz.write_tiny_models(base / "models")
    front = base / "frontend"
    front.mkdir()
    port = free_port()
    log_path = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
           str(base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--log-stdout",
           "--front-end-root", str(front)]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=os.environ["COMFYUI_PATH"], env=server_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        from dimfix.batch import ComfyClient, ComfyConnectionError

        client = ComfyClient(url, timeout=5)
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                client._json("GET", "/system_stats")
                break
            except ComfyConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not start in 180 s:\n{log_path.read_text(errors='replace')[-4000:]}")
                time.sleep(0.5)
        startup = time.monotonic() - t0
        yield {"url": url, "base": base, "models": models, "log": log_path, "client": client, "startup": startup}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_pack_and_patch_node_import_and_templates_are_served(server):
    log = server["log"].read_text(errors="replace")
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if PACK_FOLDER in line or tz.PATCH_NODE_NAME in line], failed
    info = server["client"]._json("GET", "/object_info/DimFixComparisonGrid")
    assert info["DimFixComparisonGrid"]["display_name"] == "Fix Comparison Grid"
    templates = server["client"]._json("GET", "/workflow_templates")
    assert sorted(templates[PACK_FOLDER]) == sorted(UI_NAMES.values())  # the UI files, titled for the browser
    name = UI_NAMES["zimage_dimfix_blend"]
    served = server["client"]._json("GET", f"/api/workflow_templates/{PACK_FOLDER}/{quote(name)}.json")
    assert served == json.loads((ROOT / "workflows" / f"{name}.json").read_text(encoding="utf-8"))
    # WEB_DIRECTORY: the Analyzer's report preview and the help pages reach the frontend
    for path in ("js/dimfix_report.js", "docs/DimFixDimensionAnalyzer.md", "docs/DimFixDimensionAnalyzer/zh.md"):
        status, body = server["client"]._request("GET", f"/extensions/{PACK_FOLDER}/{path}")
        assert status == 200 and body == (ROOT / "web" / path).read_bytes(), path


def test_fix_grid_workflow_over_two_prompts(server, tmp_path):
    from dimfix.batch import run_batch

    graph = small_graph("zimage_dimfix_fix_comparison_grid", server["models"].names)
    save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
    out = tmp_path / "grid"
    t0 = time.monotonic()
    results = run_batch(server["client"], graph, PROMPTS, prompt_selector="Prompt", prompt_input="value",
                        seed_selector="Seed", seed_input="value", seed=42, out_dir=out, timeout=300,
                        poll_interval=0.2)
    elapsed = time.monotonic() - t0
    print(f"\ne2e: server start {server['startup']:.1f} s, grid workflow x{len(PROMPTS)} {elapsed:.1f} s")
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert [r.seed for r in results] == [42, 43]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok", "ok"]
    # 7 cells of 64² in 4 columns -> 2 rows; 60 px label bands, 80 px title band
    expected = (2 * (SIZE + 60) + 80, 4 * SIZE)
    grids = []
    for r in results:
        saved = [f for f in r.files if f"_{save_id}_" in f]
        assert len(saved) == 1, r.files
        with Image.open(out / saved[0]) as png:
            assert png.format == "PNG" and png.size == (expected[1], expected[0])
            grids.append(np.asarray(png.convert("RGB")))
        assert (server["base"] / "output" / "zimage_dimfix").is_dir()
    assert not np.array_equal(grids[0], grids[1])  # other prompt (and seed): other images and subtitle
    history = server["client"].history(results[0].prompt_id)
    assert history["status"]["status_str"] == "success" and history["status"]["completed"]


@pytest.mark.parametrize("stem,cells", [("zimage_dimfix_blend", 2), ("zimage_dimfix_layer_select", 2),
                                       ("zimage_dimfix_base_negative", 3)])
def test_other_workflows_through_the_cli(server, tmp_path, stem, cells):
    graph = small_graph(stem, server["models"].names)
    wf = tmp_path / f"{stem}.json"
    wf.write_text(json.dumps(graph), encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A lighthouse on a cliff\n", encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dimfix.batch", "--server", server["url"], "--workflow", str(wf), "--prompts",
           str(prompts), "--prompt-node", "Prompt", "--prompt-input", "value", "--seed-node", "Seed",
           "--seed-input", "value", "--seed", "7", "--out", str(out), "--timeout", "300", "--poll", "0.2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = (out / "results.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert result["status"] == "ok" and result["seed"] == 7
    save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
    (saved,) = [f for f in result["files"] if f"_{save_id}_" in f]
    with Image.open(out / saved) as png:
        assert png.size == (cells * SIZE, SIZE + 60 + 80)
