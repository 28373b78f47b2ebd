"""A small RFC 6455 websocket client (standard library) and ComfyUI's progress events over ``/ws``.

:class:`WebSocket` does the client handshake (``Sec-WebSocket-Key`` / ``-Accept`` check), sends masked
frames, reassembles fragmented text/binary messages, answers pings and echoes the close handshake.
:class:`EventMonitor` reads ComfyUI's ``/ws?clientId=`` events (``execution_start``, ``executing``,
``progress``, ``executed``, ``execution_cached``, ``execution_success``, ``execution_error``,
``execution_interrupted``, ``status``) into per-prompt :class:`PromptState`; binary preview frames
are ignored. When the socket cannot be opened the runner polls ``/history`` instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

from .client import ComfyConnectionError

__all__ = ["WebSocket", "WebSocketError", "WebSocketClosed", "EventMonitor", "PromptState", "accept_key"]

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_MESSAGE = 64 << 20


class WebSocketError(ComfyConnectionError):
    """The websocket handshake failed or the peer broke the protocol."""


class WebSocketClosed(WebSocketError):
    """The peer closed the connection (``code`` from its close frame, 1005 when none)."""

    def __init__(self, code: int = 1005, reason: str = ""):
        super().__init__(f"websocket closed by the server (code {code}{': ' + reason if reason else ''})")
        self.code = code


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + _GUID).encode("ascii")).digest()).decode("ascii")


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (the same operation masks and unmasks)."""
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big") if n else b""


class WebSocket:
    """A blocking websocket client connection; :meth:`recv` returns whole messages ``(opcode, payload)``."""

    def __init__(self, url: str, timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss", "http", "https"):
            raise WebSocketError(f"websocket URL must start with ws:// or http://, got {url!r}")
        secure = parts.scheme in ("wss", "https")
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.url = url
        self._send_lock = threading.Lock()
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            raise WebSocketError(f"cannot open websocket {url}: {exc}") from exc
        self.sock = sock
        self._buf = b""
        try:
            self._handshake(host, port, path)
        except (OSError, WebSocketError) as exc:
            sock.close()
            if isinstance(exc, WebSocketError):
                raise
            raise WebSocketError(f"websocket handshake with {url} failed: {exc}") from exc
        sock.settimeout(None)

    def _handshake(self, host: str, port: int, path: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode("ascii"))
        while b"\r\n\r\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk or len(self._buf) > 65536:
                raise WebSocketError(f"websocket {self.url}: no HTTP answer to the upgrade request")
            self._buf += chunk
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if len(status) < 2 or status[1] != "101":
            raise WebSocketError(f"websocket {self.url}: the server answered {lines[0]!r} instead of 101")
        if headers.get("upgrade", "").lower() != "websocket" or headers.get("sec-websocket-accept") != accept_key(key):
            raise WebSocketError(f"websocket {self.url}: bad upgrade answer (Upgrade / Sec-WebSocket-Accept)")

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise WebSocketClosed(1006, "connection lost")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        if b0 & 0x70:
            raise WebSocketError(f"websocket {self.url}: reserved bits set (no extension was negotiated)")
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8))
        if length > _MAX_MESSAGE:
            raise WebSocketError(f"websocket {self.url}: frame of {length} bytes is too large")
        key = self._read(4) if b1 & 0x80 else None
        payload = self._read(length)
        return bool(b0 & 0x80), b0 & 0x0F, mask_bytes(payload, key) if key else payload

    def send(self, payload: bytes | str, opcode: int | None = None) -> None:
        """Send one masked frame (text for ``str``, binary for ``bytes`` unless ``opcode`` says otherwise)."""
        if isinstance(payload, str):
            payload, opcode = payload.encode("utf-8"), OP_TEXT if opcode is None else opcode
        opcode = OP_BINARY if opcode is None else opcode
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        key = os.urandom(4)
        with self._send_lock:
            self.sock.sendall(head + key + mask_bytes(payload, key))

    def recv(self) -> tuple[int, bytes]:
        """The next text or binary message; pings are answered, a close frame raises :class:`WebSocketClosed`."""
        opcode, parts = None, []
        while True:
            fin, op, payload = self._frame()
            if op >= 0x8:
                if op == OP_PING:
                    self.send(payload, OP_PONG)
                elif op == OP_CLOSE:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    try:
                        self.send(payload[:2], OP_CLOSE)
                    except OSError:
                        pass
                    raise WebSocketClosed(code, payload[2:].decode("utf-8", "replace"))
                continue
            if op == OP_CONT and opcode is None or op not in (OP_CONT, OP_TEXT, OP_BINARY):
                raise WebSocketError(f"websocket {self.url}: unexpected frame opcode {op}")
            if op != OP_CONT:
                if opcode is not None:
                    raise WebSocketError(f"websocket {self.url}: new message inside a fragmented one")
                opcode = op
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def close(self, code: int = 1000) -> None:
        """Send a close frame (best effort) and close the socket."""
        try:
            self.send(struct.pack("!H", code), OP_CLOSE)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass
class PromptState:
    """What the websocket said about one prompt so far."""

    node: str | None = None
    value: int | None = None
    max: int | None = None
    started: float | None = None
    finished_at: float | None = None
    outcome: str | None = None  # execution_success / execution_error / execution_interrupted
    finished: threading.Event = field(default_factory=threading.Event)


_END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class EventMonitor:
    """Reads one server's ``/ws?clientId=`` events in a daemon thread (see the module docstring)."""

    def __init__(self, base_url: str, client_id: str, on_event: Callable[[str, str, PromptState], None] | None = None,
                 timeout: float = 5.0):
        self.url = base_url.rstrip("/") + "/ws?" + urllib.parse.urlencode({"clientId": client_id})
        self.on_event = on_event
        self.timeout = timeout
        self.states: dict[str, PromptState] = {}
        self.queue_remaining: int | None = None
        self.error: str | None = None
        self._lock = threading.Lock()
        self._ws: WebSocket | None = None
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Connect and start reading; False (with :attr:`error`) when the socket cannot be opened."""
        try:
            self._ws = WebSocket(self.url, timeout=self.timeout)
        except WebSocketError as exc:
            self.error = str(exc)
            return False
        self._thread = threading.Thread(target=self._loop, name=f"ws {self.url}", daemon=True)
        self._thread.start()
        return True

    def state(self, prompt_id: str) -> PromptState:
        with self._lock:
            return self.states.setdefault(str(prompt_id), PromptState())

    def _loop(self) -> None:
        try:
            while True:
                opcode, payload = self._ws.recv()
                if opcode == OP_TEXT:
                    try:
                        msg = json.loads(payload.decode("utf-8"))
                    except ValueError:
                        continue
                    if isinstance(msg, dict):
                        self.handle(str(msg.get("type")), msg.get("data") if isinstance(msg.get("data"), dict)
                                    else {})
        except (OSError, WebSocketError) as exc:
            self.error = str(exc)

    def handle(self, kind: str, data: dict) -> None:
        """Apply one event to the prompt's state (public so that a recorded event stream can be replayed)."""
        if kind == "status":
            info = (data.get("status") or {}).get("exec_info") or {}
            if isinstance(info.get("queue_remaining"), int):
                self.queue_remaining = info["queue_remaining"]
            return
        pid = data.get("prompt_id")
        if pid is None:
            return
        st = self.state(pid)
        now = time.monotonic()
        if kind == "execution_start":
            st.started = now
        elif kind == "executing":
            if data.get("node") is None:  # older servers end a prompt with executing(node=None)
                kind = "execution_success" if st.outcome is None else kind
            else:
                st.node, st.value, st.max = str(data["node"]), None, None
        elif kind == "progress":
            st.value, st.max = data.get("value"), data.get("max")
            st.node = str(data["node"]) if data.get("node") is not None else st.node
        if kind in _END_EVENTS and not st.finished.is_set():
            st.outcome, st.finished_at = kind, now
            st.finished.set()
        if self.on_event is not None:
            self.on_event(str(pid), kind, st)

    def waiter(self, prompt_id: str, safety_poll: float = 2.0) -> Callable[[float], None]:
        """A ``wake(seconds)`` for :meth:`ComfyClient.wait`: returns as soon as the prompt's end event
        arrives (then polls every 0.05 s until the history has the entry), polls at least every
        ``safety_poll`` s while the socket is up, and sleeps ``seconds`` without it."""
        st = self.state(prompt_id)

        def wake(seconds: float) -> None:
            if st.finished.is_set():  # ended: the history entry follows within moments
                time.sleep(min(seconds, 0.05))
            elif not self.alive:
                time.sleep(seconds)
            else:
                st.finished.wait(max(seconds, safety_poll))

        return wake

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
