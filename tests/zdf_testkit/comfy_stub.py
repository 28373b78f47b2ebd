"""A local stand-in for a ComfyUI server (127.0.0.1 only) for the batch runner's tests and benchmark.

Routes: ``POST /prompt`` (honours a client ``prompt_id``), ``GET /prompt`` (``exec_info.queue_remaining``),
``GET /history/{id}``, ``GET /view``, ``POST /queue`` (delete), ``POST /interrupt`` and ``GET /ws`` (a
server-side websocket written here from RFC 6455, independent of the client under test). One executor
thread runs the queue in order, taking ``run_seconds`` per prompt and sending ComfyUI's events
(``execution_start``, ``execution_cached``, ``executing``, ``progress`` plus a binary preview frame and a
ping, ``executed``, ``execution_success`` / ``execution_error``, ``executing`` with ``node: null``).
:meth:`StubComfy.kill` closes the listening socket and every connection, like a crashed server.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

__all__ = ["StubComfy", "running", "ws_frame", "ws_read_frame"]

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked server frame."""
    n = len(payload)
    size = bytes([n]) if n < 126 else (b"\x7e" + n.to_bytes(2, "big") if n < 65536 else b"\x7f" + n.to_bytes(8, "big"))
    return bytes([(0x80 if fin else 0) | opcode]) + size + payload


def ws_read_frame(sock: socket.socket) -> tuple[int, bytes, bool]:
    """(opcode, unmasked payload, was masked) of one client frame."""
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(exact(2), "big")
    elif n == 127:
        n = int.from_bytes(exact(8), "big")
    key = exact(4) if b1 & 0x80 else b"\0\0\0\0"
    data = exact(n)
    return b0 & 0x0F, bytes(c ^ key[i % 4] for i, c in enumerate(data)), bool(b1 & 0x80)


class StubComfy:
    """One stub server; ``url``; counters ``views`` (downloads per file) and ``received`` (client frames)."""

    def __init__(self, run_seconds: float = 0.0, ws: bool = True, images_per_save: int = 2, steps: int = 2):
        self.run_seconds, self.ws_enabled, self.images_per_save, self.steps = run_seconds, ws, images_per_save, steps
        self.lock = threading.Condition()
        self.queued: list[tuple[str, dict]] = []
        self.pending: collections.deque[str] = collections.deque()
        self.running: str | None = None
        self.bodies: dict[str, dict] = {}
        self.history: dict[str, dict] = {}
        self.files: dict[tuple, bytes] = {}
        self.views: collections.Counter = collections.Counter()
        self.polls: collections.Counter = collections.Counter()
        self.posts: list[tuple[str, dict]] = []
        self.received: list[tuple[int, bytes, bool]] = []
        self.sockets: dict[str, list] = {}
        self.polls_before_done = 0
        self.prompt_reply = None  # callable(body) -> (status, obj)
        self.outcome = "success"  # error / never / cached
        self.interrupted: set[str] = set()
        self.dead = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.stub = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._threads = [threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                          daemon=True), threading.Thread(target=self._execute, daemon=True)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ execution

    def on_prompt(self, body: dict):
        if self.prompt_reply is not None:
            return self.prompt_reply(body)
        with self.lock:
            pid = str(body.get("prompt_id") or f"p{len(self.queued)}")
            self.queued.append((pid, body))
            self.bodies[pid] = body
            self.pending.append(pid)
            self.lock.notify_all()
            return 200, {"prompt_id": pid, "number": len(self.queued), "node_errors": {}}

    def _execute(self):
        while not self.dead:
            with self.lock:
                while not self.pending and not self.dead:
                    self.lock.wait(0.05)
                if self.dead:
                    return
                pid = self.running = self.pending.popleft()
            self._run_one(pid, self.bodies[pid])
            with self.lock:
                self.running = None

    def _run_one(self, pid: str, body: dict):
        cid, graph = body.get("client_id"), body["prompt"]
        stamp = lambda: int(time.time() * 1000)  # noqa: E731
        messages = [["execution_start", {"prompt_id": pid, "timestamp": stamp()}]]
        self.emit(cid, "execution_start", messages[0][1])
        outs = [nid for nid, n in graph.items() if n["class_type"] in ("SaveImage", "PreviewImage")]
        cached = outs if self.outcome == "cached" else []
        messages.append(["execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": stamp()}])
        self.emit(cid, "execution_cached", messages[-1][1])
        sampler = next((nid for nid, n in graph.items() if n["class_type"] == "KSampler"), None)
        if sampler is not None:
            self.emit(cid, "executing", {"node": sampler, "display_node": sampler, "prompt_id": pid})
            for step in range(1, self.steps + 1):
                if self.dead or pid in self.interrupted:
                    break
                time.sleep(self.run_seconds / self.steps)
                self.emit(cid, "progress", {"value": step, "max": self.steps, "prompt_id": pid, "node": sampler})
                self.send_raw(cid, ws_frame(0x2, b"\x00\x00\x00\x01\x00\x00\x00\x02PNGDATA"))
                self.send_raw(cid, ws_frame(0x9, b"hb"))
        while self.outcome == "never" and not self.dead and pid not in self.interrupted:
            time.sleep(0.01)
        if self.dead:
            return
        if pid in self.interrupted or self.outcome == "error":
            event = "execution_interrupted" if pid in self.interrupted else "execution_error"
            data = {"prompt_id": pid, "node_id": "3", "node_type": "KSampler", "exception_type": "RuntimeError",
                    "exception_message": "CUDA out of memory\n", "timestamp": stamp()}
            messages.append([event, data])
            self.emit(cid, event, data)
            entry = {"prompt": [0, pid], "outputs": {}, "status": {"status_str": "error", "completed": False,
                                                                   "messages": messages}}
        else:
            outputs = self._images(pid, graph, outs, cid)
            messages.append(["execution_success", {"prompt_id": pid, "timestamp": stamp()}])
            self.emit(cid, "execution_success", messages[-1][1])
            entry = {"prompt": [0, pid], "outputs": outputs,
                     "status": {"status_str": "success", "completed": True, "messages": messages}}
        with self.lock:
            self.history[pid] = entry
        self.emit(cid, "executing", {"node": None, "prompt_id": pid})

    def _images(self, pid, graph, outs, cid):
        texts = [n["inputs"].get("text") for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
        seed = next((n["inputs"].get("seed") for n in graph.values() if n["class_type"] == "KSampler"), None)
        outputs = {}
        for nid in outs:
            kind = "output" if graph[nid]["class_type"] == "SaveImage" else "temp"
            imgs = []
            for j in range(self.images_per_save if kind == "output" else 1):
                with self.lock:
                    fname = f"ComfyUI_{len(self.files):05d}_.png"
                    sub = "sub" if kind == "output" else ""
                    self.files[(fname, sub, kind)] = f"IMG|{texts[0] if texts else ''}|{seed}|{nid}|{j}".encode()
                imgs.append({"filename": fname, "subfolder": sub, "type": kind})
            outputs[nid] = {"images": imgs}
            self.emit(cid, "executed", {"node": nid, "display_node": nid, "output": outputs[nid], "prompt_id": pid})
        for nid, node in graph.items():  # Preview Any shows a literal text
            if node["class_type"] == "PreviewAny" and isinstance(node["inputs"].get("source"), str):
                outputs[nid] = {"text": [node["inputs"]["source"]]}
        return outputs

    # ------------------------------------------------------------------ websocket

    def emit(self, client_id, kind: str, data: dict):
        self.send_raw(client_id, ws_frame(0x1, json.dumps({"type": kind, "data": data}).encode()))

    def send_raw(self, client_id, frame: bytes):
        for sock, lock in list(self.sockets.get(client_id, [])):
            try:
                with lock:
                    sock.sendall(frame)
            except OSError:
                pass

    def queue_remaining(self) -> int:
        with self.lock:
            return len(self.pending) + (self.running is not None)

    def kill(self):
        """Stop answering at once: listening socket closed, open websockets reset, executor stopped."""
        self.dead = True
        self.httpd.shutdown()
        self.httpd.server_close()
        for conns in list(self.sockets.values()):
            for sock, _ in conns:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
        with self.lock:
            self.lock.notify_all()

    close = kill


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, obj=None, raw=None):
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def do_POST(self):
        stub = self.server.stub
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/prompt":
            self._send(*stub.on_prompt(body))
            return
        stub.posts.append((self.path, body))
        with stub.lock:
            if self.path == "/queue":
                for pid in body.get("delete") or []:
                    if pid in stub.pending:
                        stub.pending.remove(pid)
            elif self.path == "/interrupt" and stub.running and body.get("prompt_id") in (None, stub.running):
                stub.interrupted.add(stub.running)
        self._send(200, raw=b"")

    def do_GET(self):
        stub = self.server.stub
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path == "/ws":
            self._websocket(stub, q.get("clientId", ""))
        elif url.path == "/prompt":
            self._send(200, {"exec_info": {"queue_remaining": stub.queue_remaining()}})
        elif url.path.startswith("/history/"):
            pid = url.path.split("/", 2)[2]
            with stub.lock:
                stub.polls[pid] += 1
                hidden = stub.polls[pid] <= stub.polls_before_done
                self._send(200, {} if hidden or pid not in stub.history else {pid: stub.history[pid]})
        elif url.path == "/view":
            key = (q.get("filename"), q.get("subfolder", ""), q.get("type", "output"))
            stub.views[key] += 1
            self._send(200, raw=stub.files[key]) if key in stub.files else self._send(404, raw=b"not found")
        else:
            self._send(404, raw=b"")

    def _websocket(self, stub, client_id):
        key = self.headers.get("Sec-WebSocket-Key")
        if not stub.ws_enabled or not key or self.headers.get("Upgrade", "").lower() != "websocket":
            self._send(404, raw=b"no websocket here")
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        sock, entry = self.connection, (self.connection, threading.Lock())
        stub.sockets.setdefault(client_id, []).append(entry)
        status = json.dumps({"type": "status", "data": {"status": {"exec_info": {
            "queue_remaining": stub.queue_remaining()}}, "sid": client_id}}).encode()
        with entry[1]:  # the status message in two fragments: the client must reassemble them
            sock.sendall(ws_frame(0x1, status[:10], fin=False) + ws_frame(0x0, status[10:]))
        try:
            while True:
                opcode, payload, masked = ws_read_frame(sock)
                stub.received.append((opcode, payload, masked))
                if opcode == 0x8:
                    with entry[1]:
                        sock.sendall(ws_frame(0x8, payload[:2]))
                    break
        except (OSError, ConnectionError):
            pass
        finally:
            stub.sockets[client_id].remove(entry)
            self.close_connection = True


@contextlib.contextmanager
def running(**kwargs):
    """A :class:`StubComfy` that is killed on exit."""
    stub = StubComfy(**kwargs)
    try:
        yield stub
    finally:
        stub.kill()
