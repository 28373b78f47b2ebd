"""Two real ComfyUI servers run the bundled grid workflow's API twin for 4 prompts through the batch runner.

Both servers share one base directory (the pack and the TEST-ONLY detection-patch node in
``custom_nodes/``, tiny random models in ``models/``) and have their own output, temp and user folders.
Every image the runner keeps must be fetched exactly once, from the server that made it, byte for byte;
the temporary previews (analyzer plots, the grid's preview) must not be fetched at all.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zdf_testkit import tiny_zimage as tz
from zdf_testkit.host_env import server_env
from zdf_testkit.live_comfy import install_pack

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "workflows" / "api" / "zimage_dimfix_fix_comparison_grid.json"
PROMPTS = ["a red bicycle", "a bowl of soup", "a snowy cabin", "an orange kite"]
TINY_INPUTS = {"UNETLoader": ("unet_name", "dit"), "CLIPLoader": ("clip_name", "te"),
               "VAELoader": ("vae_name", "vae"), "DimFixQwen3EmbeddingLoader": ("model_name", "substitute")}
SMALL_INPUTS = {"EmptySD3LatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 1},
                "DimFixDimensionAnalyzer": {"prompts": "a fox\nan old lighthouse\na dew drop"},
                "DimFixQwen3EmbeddingLoader": {"analysis_only": True}}  # the tiny encoders are 64 wide


def _grid_graph(names: dict) -> dict:
    graph = json.loads(GRID.read_text(encoding="utf-8"))
    for node in graph.values():
        cls = node["class_type"]
        if cls in TINY_INPUTS:
            key, role = TINY_INPUTS[cls]
            node["inputs"][key] = names[role]
        node["inputs"].update(SMALL_INPUTS.get(cls, {}))
    return graph


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(base: Path, name: str) -> dict:
    dirs = {k: base / name / k for k in ("output", "temp", "user")}
    for d in dirs.values():
        d.mkdir(parents=True)
    port, log = _port(), base / name / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
           str(base), "--output-directory", str(dirs["output"]), "--temp-directory", str(dirs["temp"]),
           "--user-directory", str(dirs["user"]), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
           "--log-stdout", "--front-end-root", str(base / "frontend")]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=os.environ["COMFYUI_PATH"], env=server_env(), stdout=fh,
                                stderr=subprocess.STDOUT)
    return {"proc": proc, "url": f"http://127.0.0.1:{port}", "log": log, **dirs}


def _wait_ready(server: dict, deadline: float) -> None:
    from dimfix.batch import ComfyClient, ComfyConnectionError

    while True:
        if server["proc"].poll() is not None:
            pytest.fail(f"ComfyUI exited with {server['proc'].returncode}:\n"
                        f"{server['log'].read_text(errors='replace')[-4000:]}")
        try:
            ComfyClient(server["url"], timeout=5).queue_remaining()
            return
        except ComfyConnectionError:
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not start:\n{server['log'].read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    base = tmp_path_factory.mktemp("batch_base")
    install_pack(base / "custom_nodes")
    tz.install_test_patch_node(base / "custom_nodes")
    models = tz.write_tiny_models(base / "models")
    (base / "frontend").mkdir()
    servers = [_launch(base, f"s{i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        for server in servers:
            _wait_ready(server, deadline)
        yield servers, models.names
    finally:
        for server in servers:
            server["proc"].terminate()
        for server in servers:
            try:
                server["proc"].wait(timeout=30)
            except subprocess.TimeoutExpired:
                server["proc"].kill()
                server["proc"].wait(timeout=30)


def _counting_clients(servers):
    from dimfix.batch import ComfyClient

    fetched = collections.Counter()

    class Counting(ComfyClient):
        def download(self, ref):
            fetched[(self.base_url, ref["filename"], ref["subfolder"], ref["type"])] += 1
            return super().download(ref)

    return [Counting(s["url"], timeout=60) for s in servers], fetched


def test_grid_on_two_servers_fetches_every_image_once(two_servers, tmp_path):
    from dimfix.batch import run_batch

    servers, names = two_servers
    graph = _grid_graph(names)
    clients, fetched = _counting_clients(servers)
    out = tmp_path / "grid"
    t0 = time.monotonic()
    res = run_batch(clients, graph, PROMPTS, "Prompt", "value", "Seed", 42, out, seed_input="value", timeout=400,
                    poll_interval=0.2, save_nodes=["VAEDecode"])
    print(f"\nbatch on 2 servers: {len(PROMPTS)} grid prompts in {time.monotonic() - t0:.1f} s")
    assert [r.status for r in res] == ["ok"] * 4, [r.error for r in res]
    assert {r.server for r in res} == {s["url"] for s in servers}  # both servers worked
    assert all("wait_s" in r.timings for r in res)  # progress came over the real server's websocket
    graph = json.loads(GRID.read_text(encoding="utf-8"))
    save_id = next(k for k, v in graph.items() if v["class_type"] == "SaveImage")
    decodes = sum(v["class_type"] == "VAEDecode" for v in graph.values())
    assert decodes == 8  # the reference and seven fix modes
    expected, previews = collections.Counter(), 0
    for r in res:
        entry = next(c for c in clients if c.base_url == r.server).history(r.prompt_id)
        for ref in clients[0].outputs_images(entry):
            if ref["type"] == "output":
                expected[(r.server, ref["filename"], ref["subfolder"], ref["type"])] += 1
            else:
                previews += 1
        # the grid of the SaveImage node, then one image per VAEDecode (the reference + one per fix mode)
        assert r.files[0].endswith(f"_{save_id}_0.png") and len(r.files) == 1 + decodes
        assert len([f for f in r.files if "_dimfix-save-" in f]) == decodes
        server = next(s for s in servers if s["url"] == r.server)
        for name in r.files:  # byte-identical to a file in the output folder of the server that ran it
            assert any(k[0] == r.server and (server["output"] / k[2] / k[1]).read_bytes() == (out / name).read_bytes()
                       for k in expected), name
    assert previews >= 4 * 2  # analyzer plots / grid previews existed and were skipped
    assert fetched == expected and set(fetched.values()) == {1}
    # resume: nothing is queued or fetched again; the command line takes both servers too
    cmd = [sys.executable, "-m", "dimfix.batch", "--workflow", str(tmp_path / "wf.json"), "--prompt-node", "Prompt",
           "--prompt-input", "value", "--seed-node", "Seed", "--seed-input", "value", "--seed", "42", "--out", str(out),
           "--prompts", str(tmp_path / "p.txt"), "--save-node", "VAEDecode"]
    (tmp_path / "wf.json").write_text(json.dumps(graph), encoding="utf-8")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    for s in servers:
        cmd += ["--server", s["url"]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    statuses = [json.loads(x)["status"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert statuses[4:] == ["skipped"] * 4
    page = (out / "index.html").read_text(encoding="utf-8")
    assert all(f'<img src="{r.files[0]}"' in page for r in res)
    assert "Save · KSampler (affine) → VAEDecode" in page
