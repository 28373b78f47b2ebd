"""Several stub servers: shortest-queue dispatch, a server killed mid-batch, every server gone."""

import json
import socket
import threading
import time

import pytest

from dimfix import batch
from dimfix.batch import ComfyClient
from zdf_testkit.comfy_stub import StubComfy

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 2, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "old", "clip": ["4", 1]}, "_meta": {"title": "Prompt"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}
PROMPTS = [f"prompt {i}" for i in range(12)]


@pytest.fixture
def stubs(request):
    made = []

    def make(n, **kw):
        made.extend(StubComfy(**kw) for _ in range(n))
        return made[-n:]

    yield make
    for s in made:
        if not s.dead:
            s.kill()


def _clients(stubs):
    return [ComfyClient(s.url, timeout=2) for s in stubs]


def _lines(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def test_three_servers_share_the_work_and_lines_name_them(stubs, tmp_path):
    servers = stubs(3, run_seconds=0.03)
    res = batch.run_batch(_clients(servers), GRAPH, PROMPTS, "Prompt", seed_selector="3", seed=1,
                          out_dir=tmp_path / "o", poll_interval=0.005)
    assert [r.status for r in res] == ["ok"] * 12
    assert [r.index for r in res] == list(range(12))
    per_server = [len(s.queued) for s in servers]
    assert sum(per_server) == 12 and min(per_server) >= 2, per_server
    lines = _lines(tmp_path / "o")
    assert {l["server"] for l in lines} == {s.url for s in servers}
    for line in lines:
        stub = next(s for s in servers if s.url == line["server"])
        assert line["prompt_id"] in stub.history  # the line names the server that ran it
        assert set(line["timings"]) >= {"total_s", "execution_s", "fetch_s", "wait_s"}
    assert all(n == 1 for s in servers for n in s.views.values())  # every image fetched once


def test_dispatch_prefers_the_shortest_queue(stubs, tmp_path):
    busy, idle = stubs(2, run_seconds=0.2)
    for i in range(4):  # another user's prompts keep the first server busy
        busy.on_prompt({"prompt": GRAPH, "client_id": "someone-else", "prompt_id": f"other{i}"})
    res = batch.run_batch(_clients([busy, idle]), GRAPH, ["a", "b"], "Prompt", out_dir=tmp_path / "o",
                          poll_interval=0.005, depth=1)
    assert [r.server for r in res] == [idle.url, idle.url]
    assert len(busy.queued) == 4


def test_server_killed_mid_batch_loses_nothing(stubs, tmp_path):
    servers = stubs(3, run_seconds=0.08)
    victim = servers[1]
    out = tmp_path / "o"

    def kill_after_first():
        deadline = time.monotonic() + 20
        while not victim.history and time.monotonic() < deadline:
            time.sleep(0.002)
        victim.kill()

    killer = threading.Thread(target=kill_after_first)
    killer.start()
    res = batch.run_batch(_clients(servers), GRAPH, PROMPTS, "Prompt", seed_selector="3", seed=1, out_dir=out,
                          poll_interval=0.005, down_after=0.3)
    killer.join()
    assert [r.status for r in res] == ["ok"] * 12
    moved = [r for r in res if victim.url in r.moved_from]
    assert moved and all(r.server != victim.url for r in moved)
    assert victim.queued and len(victim.queued) > len([r for r in res if r.server == victim.url])
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["jobs"]) == 12 and all(j["state"] == "done" for j in manifest["jobs"].values())
    assert len(list(out.glob("*.png"))) == 24
    assert sorted(l["index"] for l in _lines(out)) == list(range(12))  # one line per prompt, none lost


def test_no_server_left_raises_after_recording_the_finished(stubs, tmp_path):
    (only,) = stubs(1, run_seconds=0.05)

    def kill_after_three():
        while len(only.history) < 3:  # depth 1: the first two were recorded before the third was queued
            time.sleep(0.002)
        only.kill()

    threading.Thread(target=kill_after_three, daemon=True).start()
    out = tmp_path / "o"
    with pytest.raises(batch.ComfyConnectionError, match="no ComfyUI server answers any more.*rerun"):
        batch.run_batch(_clients([only]), GRAPH, PROMPTS, "Prompt", out_dir=out, poll_interval=0.005,
                        down_after=0.2, depth=1)
    assert len([l for l in _lines(out) if l["status"] == "ok"]) >= 2
    assert "<tr><td>0</td>" in (out / "index.html").read_text()


def test_unreachable_server_at_start_is_skipped(stubs, tmp_path, capsys):
    (alive,) = stubs(1)
    (gone,) = stubs(1)
    gone.kill()
    logs = []
    res = batch.run_batch(_clients([gone, alive]), GRAPH, ["a"], "Prompt", out_dir=tmp_path / "o",
                          poll_interval=0.005, log=logs.append)
    assert res[0].status == "ok" and res[0].server == alive.url
    assert any(gone.url in m and "skipping" in m for m in logs)
    with pytest.raises(ValueError, match="same server is given twice"):
        batch.run_batch(_clients([alive, alive]), GRAPH, ["a"], "Prompt", out_dir=tmp_path / "p")


def test_resume_on_other_servers(stubs, tmp_path):
    first, b, c = stubs(3)
    out = tmp_path / "o"
    batch.run_batch(_clients([first]), GRAPH, PROMPTS[:2], "Prompt", seed_selector="3", seed=1, out_dir=out,
                    poll_interval=0.005)
    first.kill()
    res = batch.run_batch(_clients([b, c]), GRAPH, PROMPTS[:5], "Prompt", seed_selector="3", seed=1, out_dir=out,
                          poll_interval=0.005)
    assert [r.status for r in res] == ["skipped"] * 2 + ["ok"] * 3
    assert {r.server for r in res[2:]} <= {b.url, c.url} and len(b.queued) + len(c.queued) == 3


def test_a_server_that_accepts_but_never_answers_counts_as_unreachable():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # connections are accepted by the kernel, no reply ever comes
    try:
        client = ComfyClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
        with pytest.raises(batch.ComfyConnectionError, match="timed out"):
            client.queue_remaining()
    finally:
        silent.close()
