import hashlib
import json
import socket

import pytest

from dimfix import batch
from dimfix.batch import ComfyClient
from zdf_testkit.comfy_stub import running

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 2, "model": ["4", 0]}, "_meta": {"title": "KSampler"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "old", "clip": ["4", 1]}, "_meta": {"title": "Prompt"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "old2", "clip": ["4", 1]}, "_meta": {"title": "Prompt"}},
    "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}, "_meta": {"title": "Negative"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    "12": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
}


@pytest.fixture
def server():
    with running() as stub:
        yield stub, stub.url


def _client(url):
    return ComfyClient(url, timeout=5)


# ------------------------------------------------------------------------------------ client


def test_queue_history_view_round_trip(server):
    stub, url = server
    c = _client(url)
    g = batch.set_input(GRAPH, "6", "text", "a cat")
    stub.polls_before_done = 1
    pid = c.queue(g, client_id="abc", prompt_id="my-id")
    assert pid == "my-id" and stub.queued[0][1]["client_id"] == "abc"
    assert c.history(pid) is None  # not done on the first poll
    assert c.queue_remaining() in (0, 1)
    entry = c.wait(pid, timeout=5, poll_interval=0.001)
    refs = c.outputs_images(entry)
    assert [(r["node_id"], r["type"]) for r in refs] == [("9", "output"), ("9", "output"), ("12", "temp")]
    assert set(refs[0]) >= {"filename", "subfolder", "type"}
    assert c.download(refs[1]) == b"IMG|a cat|0|9|1"
    assert c.download(refs[2]) == b"IMG|a cat|0|12|0"


def test_outputs_images_orders_numeric_ids():
    entry = {"outputs": {"10": {"images": [{"filename": "b.png"}]}, "9": {"images": [{"filename": "a.png"}]},
                         "5": {"text": ["no images"]}}}
    assert [r["filename"] for r in ComfyClient.outputs_images(entry)] == ["a.png", "b.png"]
    assert ComfyClient.outputs_images({}) == []


def test_node_errors_on_200_raise_and_say_images_may_land(server):
    """Issue 11 item 6: HTTP 200 with node_errors means the valid part was queued; the error says so."""
    stub, url = server
    stub.prompt_reply = lambda body: (200, {"prompt_id": "x", "number": 1, "node_errors": {
        "12": {"errors": [{"type": "required_input_missing", "message": "Required input is missing",
                           "details": "images", "extra_info": {}}], "dependent_outputs": ["12"],
               "class_type": "PreviewImage"}}})
    with pytest.raises(batch.ComfyPromptError,
                       match=r"node 12 \(PreviewImage\): Required input is missing: images") as ei:
        _client(url).queue(GRAPH)
    assert "12" in ei.value.node_errors and ei.value.queued_prompt_id == "x"
    assert "queued only the valid part" in str(ei.value)
    assert "images may still land in ComfyUI's output folder" in str(ei.value)
    assert ("/queue", {"delete": ["x"]}) in stub.posts  # taken off the queue again


def test_cli_partial_graph_exits_2_and_mentions_output_folder(server, tmp_path, capsys):
    stub, url = server
    stub.prompt_reply = lambda body: (200, {"prompt_id": "x", "number": 1, "node_errors": {
        "9": {"errors": [{"message": "Value not in list"}], "class_type": "SaveImage"}}})
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    code = batch.main(["--server", url, "--workflow", str(wf), "--prompt-node", "6", "--out", str(tmp_path / "o"),
                       "--limit", "1", "--poll", "0.001", "--quiet"])
    assert code == 2
    assert "may still land in ComfyUI's output folder" in capsys.readouterr().err


def test_http_400_raises_with_server_message(server):
    stub, url = server
    stub.prompt_reply = lambda body: (400, {"error": {"type": "invalid_prompt", "message": "Cannot execute because a node is missing the class_type property.", "details": "Node ID '#1'", "extra_info": {}}, "node_errors": {}})
    with pytest.raises(batch.ComfyPromptError, match="HTTP 400.*missing the class_type property.*Node ID '#1'"):
        _client(url).queue(GRAPH)


@pytest.mark.parametrize("outcome,error,match,timeout", [
    ("error", batch.ComfyExecutionError, r"node 3 \(KSampler\): RuntimeError: CUDA out of memory", 5),
    ("never", batch.ComfyTimeout, r"prompt \S+ did not finish within 0.05 s", 0.05)])
def test_wait_raises_on_execution_error_and_timeout(server, outcome, error, match, timeout):
    stub, url = server
    stub.outcome = outcome
    c = _client(url)
    pid = c.queue(GRAPH)
    with pytest.raises(error, match=match):
        c.wait(pid, timeout=timeout, poll_interval=0.005)
    assert stub.polls[pid] >= 1 + (outcome == "never")


def test_unreachable_server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(batch.ComfyConnectionError, match=f"cannot reach ComfyUI at http://127.0.0.1:{port}"):
        ComfyClient(f"127.0.0.1:{port}", timeout=2).queue(GRAPH)


# ------------------------------------------------------------------------------------ graph


def test_set_input_by_id_title_class_and_no_mutation():
    before = json.dumps(GRAPH, sort_keys=True)
    g = batch.set_input(GRAPH, 3, "seed", 42)
    assert g["3"]["inputs"]["seed"] == 42 and GRAPH["3"]["inputs"]["seed"] == 0
    g = batch.set_input(GRAPH, "Negative", "text", "blurry")
    assert g["8"]["inputs"]["text"] == "blurry"
    g = batch.set_input(GRAPH, "SaveImage", "filename_prefix", "run")
    assert g["9"]["inputs"]["filename_prefix"] == "run"
    g = batch.set_input(GRAPH, "Prompt", "text", "a dog", multiple=True)
    assert g["6"]["inputs"]["text"] == g["7"]["inputs"]["text"] == "a dog"
    assert g["8"]["inputs"]["text"] == ""
    assert json.dumps(GRAPH, sort_keys=True) == before


def test_set_input_errors():
    with pytest.raises(batch.WorkflowError, match=r"ambiguous.*6: CLIPTextEncode 'Prompt'.*7: CLIPTextEncode 'Prompt'"):
        batch.set_input(GRAPH, "Prompt", "text", "x")
    with pytest.raises(batch.WorkflowError, match=r"no node matches 'Positive'.*6: CLIPTextEncode 'Prompt'"):
        batch.set_input(GRAPH, "Positive", "text", "x")
    with pytest.raises(batch.WorkflowError, match=r"node 3 \(KSampler\) has no input 'noise_seed'; inputs: model, seed, steps"):
        batch.set_input(GRAPH, "3", "noise_seed", 1)
    with pytest.raises(batch.WorkflowError, match="connected to node 4"):
        batch.set_input(GRAPH, "KSampler", "model", 1)


def test_load_api_workflow_and_ui_rejection(tmp_path):
    api = tmp_path / "api.json"
    api.write_text(json.dumps(GRAPH))
    assert batch.load_api_workflow(api) == GRAPH
    wrapped = tmp_path / "body.json"
    wrapped.write_text(json.dumps({"prompt": GRAPH, "client_id": "x"}))
    assert batch.load_api_workflow(wrapped) == GRAPH
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"last_node_id": 9, "nodes": [{"id": 1, "type": "KSampler"}], "links": [], "version": 0.4}))
    with pytest.raises(batch.WorkflowError, match=r"ui.json: this is a UI workflow; export with 'Save \(API\)'"):
        batch.load_api_workflow(ui)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"1": {"inputs": {}}}))
    with pytest.raises(batch.WorkflowError, match="Save \\(API\\).*without class_type: 1"):
        batch.load_api_workflow(odd)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(batch.WorkflowError, match="not valid JSON"):
        batch.load_api_workflow(bad)
    with pytest.raises(batch.WorkflowError, match="not found"):
        batch.load_api_workflow(tmp_path / "missing.json")


def test_slugify():
    assert batch.slugify("A cat, asleep!") == "a-cat-asleep"
    assert batch.slugify("Pão de queijo") == "pao-de-queijo"
    assert batch.slugify("日本") == "prompt"
    assert len(batch.slugify("word " * 30)) <= 40


# ------------------------------------------------------------------------------------ batch


def _lines(out):
    return [json.loads(l) for l in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def test_run_batch_downloads_and_logs(server, tmp_path):
    stub, url = server
    out = tmp_path / "out"
    res = batch.run_batch(_client(url), GRAPH, ["A cat", "Pão de queijo"], "Prompt", seed_selector="KSampler",
                          seed=42, out_dir=out, poll_interval=0.001)
    assert [r.status for r in res] == ["ok", "ok"]
    # default fetch: only the SaveImage outputs, not the temp preview of node 12
    assert res[0].files == ["000_a-cat_9_0.png", "000_a-cat_9_1.png"]
    assert res[1].files[0] == "001_pao-de-queijo_9_0.png"
    assert (out / "001_pao-de-queijo_9_1.png").read_bytes() == "IMG|Pão de queijo|43|9|1".encode()
    assert not list(out.glob("*_12_*"))
    # both Prompt nodes were set, the negative untouched; seeds increment
    sent = {q[1]["prompt"]["6"]["inputs"]["text"]: q[1]["prompt"] for q in stub.queued}["Pão de queijo"]
    assert sent["7"]["inputs"]["text"] == "Pão de queijo" and sent["8"]["inputs"]["text"] == ""
    assert sorted(q[1]["prompt"]["3"]["inputs"]["seed"] for q in stub.queued) == [42, 43]
    assert len({q[1]["client_id"] for q in stub.queued}) == 1
    lines = sorted(_lines(out), key=lambda l: l["index"])
    assert [l["prompt"] for l in lines] == ["A cat", "Pão de queijo"]
    assert lines[0]["prompt_id"] == res[0].prompt_id == stub.queued[0][0]
    assert lines[0]["status"] == "ok" and lines[0]["seed"] == 42 and lines[0]["server"] == url
    assert lines[0]["files"] == res[0].files and lines[0]["seconds"] >= 0 and lines[0]["cached"] is False
    assert set(lines[0]["timings"]) >= {"total_s", "fetch_s", "execution_s"}
    assert not list(out.glob(".*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    f0 = manifest["jobs"]["000_a-cat"]["files"][0]
    assert f0["name"] == "000_a-cat_9_0.png" and f0["bytes"] == len(b"IMG|A cat|42|9|0")
    assert f0["sha256"] == hashlib.sha256(b"IMG|A cat|42|9|0").hexdigest()
    assert stub.views[("ComfyUI_00000_.png", "sub", "output")] == 1


def test_run_batch_fixed_seed_and_workflow_seed(server, tmp_path):
    stub, url = server
    batch.run_batch(_client(url), GRAPH, ["a", "b"], "6", seed_selector="3", seed=7, seed_mode="fixed",
                    out_dir=tmp_path / "f", poll_interval=0.001)
    batch.run_batch(_client(url), GRAPH, ["c"], "6", out_dir=tmp_path / "g", poll_interval=0.001)
    assert [q[1]["prompt"]["3"]["inputs"]["seed"] for q in stub.queued] == [7, 7, 0]


def test_run_batch_records_execution_errors_and_timeouts(server, tmp_path):
    stub, url = server
    stub.outcome = "error"
    res = batch.run_batch(_client(url), GRAPH, ["a", "b"], "6", out_dir=tmp_path / "e", poll_interval=0.001)
    assert [r.status for r in res] == ["error", "error"]
    assert "CUDA out of memory" in res[0].error
    res = batch.run_batch(_client(url), GRAPH, ["a", "b", "c", "d"], "6", out_dir=tmp_path / "s",
                          poll_interval=0.001, stop_on_error=True, depth=1)
    assert len(res) == 1  # nothing new was queued after the first failure
    stub.outcome = "never"
    res = batch.run_batch(_client(url), GRAPH, ["a"], "6", out_dir=tmp_path / "t", timeout=0.03,
                          poll_interval=0.005, websocket=False)
    assert res[0].status == "timeout" and _lines(tmp_path / "t")[0]["status"] == "timeout"


def test_run_batch_rejected_graph_raises_before_more_prompts(server, tmp_path):
    stub, url = server
    stub.prompt_reply = lambda body: (400, {"error": {"message": "Prompt outputs failed validation"},
                                            "node_errors": {}})
    with pytest.raises(batch.ComfyPromptError, match="failed validation"):
        batch.run_batch(_client(url), GRAPH, ["a", "b"], "6", out_dir=tmp_path / "r", poll_interval=0.001)


def test_run_batch_cached_flag(server, tmp_path):
    stub, url = server
    stub.outcome = "cached"
    res = batch.run_batch(_client(url), GRAPH, ["a"], "6", out_dir=tmp_path / "c", poll_interval=0.001)
    assert res[0].status == "ok" and res[0].cached is True


def test_run_batch_selector_errors_before_queueing(server, tmp_path):
    stub, url = server
    with pytest.raises(batch.WorkflowError, match="no node matches 'Positive'"):
        batch.run_batch(_client(url), GRAPH, ["a"], "Positive", out_dir=tmp_path / "x")
    with pytest.raises(batch.WorkflowError, match="has no input 'seed'"):
        batch.run_batch(_client(url), GRAPH, ["a"], "6", seed_selector="SaveImage", seed=1, out_dir=tmp_path / "x")
    with pytest.raises(batch.WorkflowError, match="fetch node 'Nope': no node matches"):
        batch.run_batch(_client(url), GRAPH, ["a"], "6", fetch_nodes=["Nope"], out_dir=tmp_path / "x")
    assert stub.queued == []


def test_ctrl_c_interrupts_server_and_stops(server, tmp_path, monkeypatch):
    stub, url = server
    c = _client(url)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(c, "wait", boom)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(c, GRAPH, ["a", "b", "c"], "6", out_dir=tmp_path / "i", poll_interval=0.001, depth=1)
    assert ("/queue", {"delete": [stub.queued[0][0]]}) in stub.posts
    assert ("/interrupt", {"prompt_id": stub.queued[0][0]}) in stub.posts
    assert len(stub.queued) == 1
    assert [l["status"] for l in _lines(tmp_path / "i")] == ["interrupted"]


# ------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(server, tmp_path, capsys):
    stub, url = server
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    prompts = tmp_path / "p.txt"
    prompts.write_text("# test\nA red apple\n\nA blue car\nA red apple\nA green tree\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--server", url, "--workflow", str(wf), "--prompts", str(prompts), "--prompt-node", "Prompt",
            "--seed-node", "KSampler", "--seed", "5", "--out", str(out), "--limit", "2", "--poll", "0.001"]
    assert batch.main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_a-red-apple_9_0.png", "000_a-red-apple_9_1.png", "001_a-blue-car_9_0.png",
                     "001_a-blue-car_9_1.png", "index.html", "manifest.json", "results.jsonl"]
    err = capsys.readouterr().err
    assert "duplicate" in err and "2/2 jobs done" in err
    # second run: everything skipped, still success, nothing queued again
    assert batch.main(args + ["--quiet"]) == 0
    assert [l["status"] for l in _lines(out)][2:] == ["skipped", "skipped"]
    assert len(stub.queued) == 2
    # --fetch all also takes the temp previews
    assert batch.main(args + ["--out", str(tmp_path / "all"), "--limit", "1", "--fetch", "all", "--quiet"]) == 0
    assert (tmp_path / "all" / "000_a-red-apple_12_0.png").read_bytes() == b"IMG|A red apple|5|12|0"


def test_cli_default_corpus_and_errors(server, tmp_path, capsys):
    stub, url = server
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    out = tmp_path / "o"
    assert batch.main(["--server", url, "--workflow", str(wf), "--prompt-node", "6", "--out", str(out),
                       "--limit", "1", "--poll", "0.001", "--quiet"]) == 0
    assert json.loads((out / "results.jsonl").read_text())["prompt"] == "A cat sleeping in sunlight"
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    assert batch.main(["--server", url, "--workflow", str(ui), "--prompt-node", "6", "--out", str(out)]) == 2
    assert "Save (API)" in capsys.readouterr().err
    assert batch.main(["--server", url, "--workflow", str(wf), "--prompt-node", "Nope", "--out", str(out)]) == 2
    assert batch.main(["--server", url, "--workflow", str(wf), "--prompt-node", "6", "--seed", "3",
                       "--out", str(out)]) == 2
    stub.outcome = "error"
    assert batch.main(["--server", url, "--workflow", str(wf), "--prompt-node", "6", "--out", str(tmp_path / "e"),
                       "--limit", "1", "--poll", "0.001", "--quiet"]) == 1
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert batch.main(["--server", f"http://127.0.0.1:{port}", "--workflow", str(wf), "--prompt-node", "6",
                       "--out", str(tmp_path / "u"), "--limit", "1", "--quiet"]) == 3
