"""Batch resume from ``manifest.json``: a job is done only when all its files are present and complete."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dimfix import batch
from dimfix.batch import ComfyClient
from zdf_testkit.comfy_stub import StubComfy, running

ROOT = Path(__file__).resolve().parents[2]
GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 2, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "old", "clip": ["4", 1]}, "_meta": {"title": "Prompt"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}


@pytest.fixture
def stub():
    with running() as s:
        yield s


def _run(stub, out, prompts, client=None, **kw):
    kw.setdefault("poll_interval", 0.002)
    return batch.run_batch(client or ComfyClient(stub.url, timeout=5), GRAPH, prompts, "Prompt",
                           seed_selector="3", out_dir=out, **kw)


def _stamp(path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _texts(stub, start=0):
    return [body["prompt"]["6"]["inputs"]["text"] for _, body in stub.queued[start:]]


def test_prompt_stopped_between_two_downloads_is_redone(stub, tmp_path):
    """The old rule (any file with the prompt's prefix = done) skipped this prompt and reported success."""
    out = tmp_path / "out"
    _run(stub, out, ["A cat", "A dog"], seed=1, depth=1)
    before = {p.name: _stamp(p) for p in out.glob("000_*.png")}
    assert len(before) == 2
    client = ComfyClient(stub.url, timeout=5)
    real, calls = client.download, []

    def stop_on_second(ref):
        calls.append(ref)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is stopped between the two downloads of one prompt
        return real(ref)

    client.download = stop_on_second
    (out / "001_a-dog_9_0.png").unlink()
    (out / "001_a-dog_9_1.png").unlink()
    with pytest.raises(KeyboardInterrupt):
        _run(stub, out, ["A cat", "A dog"], client=client, seed=1)
    assert [p.name for p in out.glob("001_*.png")] == ["001_a-dog_9_0.png"]  # one image of two
    (out / ".001_a-dog_9_1.png.0123abcd.tmp").write_bytes(b"IMG|A")  # as a SIGKILL mid-write leaves it
    queued = len(stub.queued)
    res = _run(stub, out, ["A cat", "A dog"], seed=1)
    assert not list(out.glob(".*.tmp"))
    assert [r.status for r in res] == ["skipped", "ok"]
    assert _texts(stub, queued) == ["A dog"]
    assert sorted(p.name for p in out.glob("001_*.png")) == ["001_a-dog_9_0.png", "001_a-dog_9_1.png"]
    assert (out / "001_a-dog_9_1.png").read_bytes() == b"IMG|A dog|2|9|1"
    assert {p.name: _stamp(p) for p in out.glob("000_*.png")} == before  # nothing finished was rewritten


def test_missing_or_truncated_file_makes_the_job_unfinished(stub, tmp_path):
    out = tmp_path / "out"
    _run(stub, out, ["A cat", "A dog", "A cow"], seed=1)
    keep = _stamp(out / "002_a-cow_9_0.png")
    (out / "000_a-cat_9_1.png").unlink()
    (out / "001_a-dog_9_0.png").write_bytes(b"IMG|A d")  # truncated
    n = len(stub.queued)
    res = _run(stub, out, ["A cat", "A dog", "A cow"], seed=1)
    assert [r.status for r in res] == ["ok", "ok", "skipped"]
    assert sorted(_texts(stub, n)) == ["A cat", "A dog"]
    assert (out / "001_a-dog_9_0.png").read_bytes() == b"IMG|A dog|2|9|0"
    assert _stamp(out / "002_a-cow_9_0.png") == keep


def test_foreign_files_and_other_settings_are_never_replaced(stub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000_a-cat_9_0.png").write_bytes(b"mine")
    res = _run(stub, out, ["A cat", "A dog"], seed=1)
    assert [r.status for r in res] == ["error", "ok"]
    assert "000_a-cat_9_0.png exist(s) but not in manifest.json" in res[0].error
    assert (out / "000_a-cat_9_0.png").read_bytes() == b"mine" and _texts(stub) == ["A dog"]
    res = _run(stub, out, ["A cat", "A dog"], seed=5)  # another seed: the dog's files are another result
    assert [r.status for r in res] == ["error", "error"]
    assert "made with another seed" in res[1].error and len(stub.queued) == 1
    res = _run(stub, out, ["A cat"], seed=1, overwrite=True)
    assert res[0].status == "ok" and (out / "000_a-cat_9_0.png").read_bytes() == b"IMG|A cat|1|9|0"


def test_random_base_seed_is_recorded_and_reused(stub, tmp_path):
    out = tmp_path / "out"
    first = _run(stub, out, ["A cat"], depth=1)
    res = _run(stub, out, ["A cat", "A dog"])
    assert [r.status for r in res] == ["skipped", "ok"]
    assert res[1].seed == (first[0].seed + 1) % 2**32
    assert json.loads((out / "manifest.json").read_text())["run"]["base_seed"] == first[0].seed


def test_resume_after_the_whole_run_was_killed(tmp_path):
    """SIGKILL of the runner mid-batch; the rerun queues exactly the prompts that did not finish."""
    stub = StubComfy(run_seconds=0.15)
    try:
        wf, prompts, out = tmp_path / "wf.json", tmp_path / "p.txt", tmp_path / "out"
        wf.write_text(json.dumps(GRAPH))
        names = [f"prompt number {i}" for i in range(8)]
        prompts.write_text("\n".join(names) + "\n")
        cmd = [sys.executable, "-m", "dimfix.batch", "--server", stub.url, "--workflow", str(wf), "--prompts",
               str(prompts), "--prompt-node", "Prompt", "--seed-node", "3", "--seed", "3", "--out", str(out),
               "--poll", "0.01", "--quiet"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
            if len(lines) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        done = {json.loads(x)["prompt"] for x in (out / "results.jsonl").read_text().splitlines()}
        assert 3 <= len(done) < 8, proc.stderr.read()
        stamps = {p.name: _stamp(p) for p in out.glob("*.png")
                  if any(p.name.startswith(f"{i:03d}_") for i, n in enumerate(names) if n in done)}
        n = len(stub.queued)
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert sorted(_texts(stub, n)) == sorted(set(names) - done)
        assert {p: _stamp(out / p) for p in stamps} == stamps
        manifest = json.loads((out / "manifest.json").read_text())
        assert all(manifest["jobs"][k]["state"] == "done" for k in manifest["jobs"]) and len(manifest["jobs"]) == 8
        assert len(list(out.glob("*.png"))) == 16
    finally:
        stub.kill()
