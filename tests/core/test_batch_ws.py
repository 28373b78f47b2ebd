"""The standard-library websocket client and ComfyUI progress events, against a stub server on 127.0.0.1."""

import base64
import hashlib
import io
import json
import socket
import threading
import time

import pytest

from dimfix import batch
from dimfix.batch import ComfyClient
from dimfix.batch import ws as wsmod
from dimfix.batch.display import LiveLine
from zdf_testkit.comfy_stub import StubComfy, running

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 2, "model": ["4", 0]},
          "_meta": {"title": "Sampler"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "old", "clip": ["4", 1]}, "_meta": {"title": "Prompt"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}


@pytest.fixture
def stub():
    with running(run_seconds=0.05, steps=3) as s:
        yield s


def test_accept_key_and_masking_match_rfc6455():
    # RFC 6455 §1.3 example handshake
    assert wsmod.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    ref = base64.b64encode(hashlib.sha1(b"abc" + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
    assert wsmod.accept_key("abc") == ref
    key = bytes([0x37, 0xFA, 0x21, 0x3D])  # RFC 6455 §5.7: masked "Hello"
    assert wsmod.mask_bytes(b"Hello", key) == bytes([0x7F, 0x9F, 0x4D, 0x51, 0x58])
    data = bytes(range(256)) * 3 + b"xy"
    assert wsmod.mask_bytes(data, key) == bytes(c ^ key[i % 4] for i, c in enumerate(data))
    assert wsmod.mask_bytes(b"", key) == b""


def test_handshake_fragments_ping_binary_lengths_and_close(stub):
    conn = wsmod.WebSocket(stub.url + "/ws?clientId=me", timeout=5)
    opcode, payload = conn.recv()  # the status message arrives in two fragments
    assert opcode == wsmod.OP_TEXT and json.loads(payload)["data"]["sid"] == "me"
    sizes = [0, 125, 126, 65535, 65536]
    for n in sizes:
        conn.send("x" * n)
    stub.send_raw("me", b"\x89\x02hi")  # ping
    big = json.dumps({"type": "big", "data": {"x": "y" * 70000}})
    stub.emit("me", "big", {"x": "y" * 70000})
    stub.send_raw("me", b"\x82\x03abc")
    assert conn.recv() == (wsmod.OP_TEXT, big.encode())  # 64-bit length; the ping was answered on the way
    assert conn.recv() == (wsmod.OP_BINARY, b"abc")
    conn.close()
    deadline = time.monotonic() + 5
    while not any(op == 0x8 for op, _, _ in stub.received) and time.monotonic() < deadline:
        time.sleep(0.01)
    texts = [p for op, p, _ in stub.received if op == 0x1]
    assert [len(t) for t in texts] == sizes
    assert (0xA, b"hi", True) in stub.received  # pong, masked, same payload
    assert all(masked for _, _, masked in stub.received)
    assert stub.received[-1][:2] == (0x8, (1000).to_bytes(2, "big"))


def test_refused_and_bad_handshakes():
    no_ws = StubComfy(ws=False)
    try:
        with pytest.raises(wsmod.WebSocketError, match="answered 'HTTP/1.1 404"):
            wsmod.WebSocket(no_ws.url + "/ws?clientId=x", timeout=5)
    finally:
        no_ws.kill()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def wrong_accept():
        c, _ = srv.accept()
        c.recv(4096)
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n")
        c.close()

    t = threading.Thread(target=wrong_accept)
    t.start()
    with pytest.raises(wsmod.WebSocketError, match="Sec-WebSocket-Accept"):
        wsmod.WebSocket(f"http://127.0.0.1:{srv.getsockname()[1]}/ws", timeout=5)
    t.join()
    port = srv.getsockname()[1]
    srv.close()
    with pytest.raises(wsmod.WebSocketError, match="cannot open websocket"):
        wsmod.WebSocket(f"http://127.0.0.1:{port}/ws", timeout=2)


def test_monitor_parses_progress_and_end_events(stub):
    seen = []
    mon = wsmod.EventMonitor(stub.url, "cid", on_event=lambda pid, kind, st: seen.append((pid, kind, st.node,
                                                                                          st.value, st.max)))
    assert mon.start()
    pid = ComfyClient(stub.url).queue(GRAPH, client_id="cid", prompt_id="p-1")
    assert mon.state(pid).finished.wait(5)
    st = mon.state(pid)
    assert st.outcome == "execution_success" and st.started is not None and st.finished_at >= st.started
    kinds = [k for p, k, *_ in seen if p == pid]
    assert kinds[0] == "execution_start" and "executed" in kinds and "execution_success" in kinds
    assert [(n, v, m) for p, k, n, v, m in seen if k == "progress"] == [("3", 1, 3), ("3", 2, 3), ("3", 3, 3)]
    assert mon.queue_remaining == 0
    mon.handle("executing", {"node": None, "prompt_id": "old-style"})  # pre-success servers end like this
    assert mon.state("old-style").finished.is_set()
    mon.close()
    assert not mon.alive


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_run_uses_websocket_and_live_line(stub, tmp_path):
    tty, log = _Tty(), io.StringIO()
    live = LiveLine(2, stream=tty, log_stream=log)
    res = []
    # history polling every 600 s: the run ends within the join only because the socket woke the waits
    run = threading.Thread(target=lambda: res.extend(batch.run_batch(
        ComfyClient(stub.url), GRAPH, ["a", "b"], "Prompt", out_dir=tmp_path / "o", poll_interval=600,
        display=live, depth=1)), daemon=True)
    run.start()
    run.join(timeout=60)
    assert not run.is_alive() and [r.status for r in res] == ["ok", "ok"]
    assert "wait_s" in res[0].timings  # only known from websocket events
    shown = tty.getvalue()
    assert ": #1 Sampler 2/3" in shown and "#2 " in shown and "[1/2 done]" in shown
    assert shown.endswith("\r\x1b[K") and "[2/2] ok" in log.getvalue()


def test_live_line_quiet_off_a_terminal_and_under_quiet(stub, tmp_path):
    for live in (LiveLine(1, stream=io.StringIO(), log_stream=io.StringIO()),
                 LiveLine(1, stream=_Tty(), log_stream=io.StringIO(), quiet=True)):
        batch.run_batch(ComfyClient(stub.url), GRAPH, ["a"], "Prompt", out_dir=tmp_path / str(id(live)),
                        poll_interval=0.01, display=live)
        assert live.stream.getvalue() == ""
        assert (live.log_stream.getvalue() == "") == live.quiet


def test_polling_fallback_when_ws_is_refused(tmp_path):
    stub = StubComfy(ws=False, run_seconds=0.02)
    try:
        logs = []
        res = batch.run_batch(ComfyClient(stub.url), GRAPH, ["a"], "Prompt", out_dir=tmp_path / "o",
                              poll_interval=0.005, log=logs.append)
        assert res[0].status == "ok" and "wait_s" not in res[0].timings
        assert any("no websocket" in m and "polling /history instead" in m for m in logs)
        assert max(stub.polls.values()) >= 2
    finally:
        stub.kill()
