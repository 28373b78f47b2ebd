"""ComfyUI HTTP client of the batch runner: ``/prompt``, ``/history``, ``/view``, ``/queue``, ``/interrupt``."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

__all__ = ["ComfyError", "ComfyConnectionError", "ComfyPromptError", "ComfyExecutionError", "ComfyTimeout",
           "ComfyClient"]


class ComfyError(RuntimeError):
    """Base class of errors reported by the ComfyUI server or while talking to it."""


class ComfyConnectionError(ComfyError):
    """The server could not be reached (refused, reset, or no answer within the client timeout)."""


class ComfyPromptError(ComfyError):
    """``POST /prompt`` rejected the graph (HTTP 400 or non-empty ``node_errors``).

    ``queued_prompt_id`` is set when the server queued the valid part of the graph anyway.
    """

    def __init__(self, message: str, node_errors: dict | None = None, queued_prompt_id: str | None = None):
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.queued_prompt_id = queued_prompt_id


class ComfyExecutionError(ComfyError):
    """The prompt ran and failed (``status.status_str == "error"``), or was interrupted."""

    def __init__(self, message: str, prompt_id: str = "", interrupted: bool = False):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.interrupted = interrupted


class ComfyTimeout(ComfyError, TimeoutError):
    """The prompt did not finish in time."""


def _format_node_errors(node_errors: dict) -> str:
    parts = []
    for node_id, info in sorted(node_errors.items(), key=lambda kv: str(kv[0])):
        info = info if isinstance(info, dict) else {"errors": [info]}
        msgs = []
        for e in info.get("errors") or []:
            if isinstance(e, dict):
                text, details = e.get("message", ""), e.get("details")
                msgs.append(f"{text}: {details}" if details else text)
            else:
                msgs.append(str(e))
        parts.append(f"node {node_id} ({info.get('class_type', '?')}): " + "; ".join(m for m in msgs if m))
    return "\n  ".join(parts)


def _format_error_field(error: Any) -> str:
    if isinstance(error, dict):
        msg = error.get("message") or error.get("type") or "error"
        details = error.get("details")
        return f"{msg}: {details}" if details and details != msg else str(msg)
    return str(error)


class ComfyClient:
    """Minimal ComfyUI HTTP client (``/prompt``, ``/history``, ``/view``, ``/interrupt``, ``/queue``, ``/free``)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8188", timeout: float = 30.0):
        base_url = base_url.strip().rstrip("/")
        if not re.match(r"^https?://", base_url):
            base_url = "http://" + base_url
        self.base_url = base_url
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"ComfyClient({self.base_url!r})"

    def _request(self, method: str, path: str, body: Any = None, query: dict | None = None) -> tuple[int, bytes]:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read() if exc.fp is not None else b""
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ComfyConnectionError(f"cannot reach ComfyUI at {self.base_url} ({method} {path}): {reason}") from exc

    def _json(self, method: str, path: str, body: Any = None, query: dict | None = None) -> Any:
        status, raw = self._request(method, path, body, query)
        if status != 200:
            raise ComfyError(f"{method} {path} failed with HTTP {status}: {raw[:500].decode('utf-8', 'replace')}")
        try:
            return json.loads(raw.decode("utf-8")) if raw else None
        except ValueError as exc:
            raise ComfyError(f"{method} {path}: the server did not return JSON: {raw[:200]!r}") from exc

    def queue(self, graph: dict, client_id: str | None = None, prompt_id: str | None = None) -> str:
        """``POST /prompt``; returns the prompt id. Raises :class:`ComfyPromptError` on rejection.

        When the server answers 200 but lists ``node_errors`` it has queued the valid outputs of the
        graph: that prompt is removed from the queue again and the error says its images may still
        appear in ComfyUI's output folder (when it had already started).
        """
        body: dict[str, Any] = {"prompt": graph}
        if client_id:
            body["client_id"] = client_id
        if prompt_id:
            body["prompt_id"] = prompt_id
        status, raw = self._request("POST", "/prompt", body)
        try:
            data = json.loads(raw.decode("utf-8")) if raw else {}
        except ValueError:
            data = None
        if status != 200:
            if isinstance(data, dict):
                node_errors = data.get("node_errors") or {}
                msg = _format_error_field(data.get("error", "invalid prompt"))
                if node_errors:
                    msg += "\n  " + _format_node_errors(node_errors)
            else:
                node_errors, msg = {}, raw[:500].decode("utf-8", "replace")
            raise ComfyPromptError(f"ComfyUI at {self.base_url} rejected the workflow (HTTP {status}): {msg}",
                                   node_errors)
        if not isinstance(data, dict) or "prompt_id" not in data:
            raise ComfyError(f"POST /prompt: unexpected answer {raw[:200]!r}")
        pid = str(data["prompt_id"])
        node_errors = data.get("node_errors") or {}
        if node_errors:
            try:
                self.delete_queued([pid])
            except ComfyError:
                pass
            raise ComfyPromptError(
                f"ComfyUI at {self.base_url} queued only the valid part of the workflow (prompt {pid}) and "
                "rejected these outputs:\n  " + _format_node_errors(node_errors) + "\n  The prompt was removed "
                "from the queue; if it had already started, its images may still land in ComfyUI's output "
                "folder.", node_errors, queued_prompt_id=pid)
        return pid

    def queue_remaining(self) -> int:
        """Prompts running or pending on the server (``GET /prompt`` → ``exec_info.queue_remaining``)."""
        data = self._json("GET", "/prompt")
        try:
            return int(data["exec_info"]["queue_remaining"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ComfyError(f"GET /prompt at {self.base_url}: no exec_info.queue_remaining in {data!r:.200}") from exc

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of ``prompt_id`` (``{"outputs", "status", ...}``) or None while not finished."""
        data = self._json("GET", "/history/" + urllib.parse.quote(str(prompt_id), safe=""))
        if isinstance(data, dict) and prompt_id in data:
            return data[prompt_id]
        return None

    def wait(self, prompt_id: str, timeout: float = 600.0, poll_interval: float = 0.5,
             wake=None) -> dict:
        """Poll the history until the prompt is done; raise on execution error, interruption or timeout.

        ``wake(seconds)`` (optional) replaces the sleep between polls: it may return early when a
        websocket event says the prompt finished.
        """
        deadline = time.monotonic() + float(timeout)
        sleep = wake or time.sleep
        while True:
            entry = self.history(prompt_id)
            if entry is not None and _finished(entry):
                _raise_for_status(prompt_id, entry)
                return entry
            left = deadline - time.monotonic()
            if left <= 0:
                raise ComfyTimeout(f"prompt {prompt_id} did not finish within {timeout:g} s on {self.base_url} "
                                   "(still queued or running on the server)")
            sleep(min(max(0.0, float(poll_interval)), left))

    @staticmethod
    def outputs_images(history_entry: dict) -> list[dict]:
        """Image references ``{filename, subfolder, type, node_id}`` of a history entry, in node-id order."""
        outputs = history_entry.get("outputs") or {}

        def key(node_id: str) -> tuple:
            return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))

        refs = []
        for node_id in sorted(outputs, key=key):
            for img in (outputs[node_id] or {}).get("images") or []:
                if isinstance(img, dict) and img.get("filename"):
                    refs.append({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                 "type": img.get("type", "output"), "node_id": str(node_id)})
        return refs

    def download(self, image_ref: dict) -> bytes:
        """``GET /view`` of one image reference; returns the file bytes."""
        query = {"filename": image_ref["filename"], "subfolder": image_ref.get("subfolder", ""),
                 "type": image_ref.get("type", "output")}
        status, raw = self._request("GET", "/view", query=query)
        if status != 200:
            raise ComfyError(f"GET /view {query} at {self.base_url} failed with HTTP {status}")
        return raw

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt`` (only ``prompt_id`` when given and the server supports targeted interrupts)."""
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def delete_queued(self, prompt_ids: Sequence[str]) -> None:
        """Remove pending prompts from the server queue (``POST /queue {"delete": [...]}``)."""
        self._request("POST", "/queue", {"delete": list(prompt_ids)})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """``POST /free``: unload models / free cached memory on the server."""
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})


def _finished(entry: dict) -> bool:
    status = entry.get("status")
    if not isinstance(status, dict) or "completed" not in status:
        return True  # older servers: a history entry exists only once the prompt ended
    return bool(status.get("completed")) or status.get("status_str") in ("success", "error")


def _raise_for_status(prompt_id: str, entry: dict) -> None:
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return
    lines, interrupted = [], False
    for event, data in status_messages(entry):
        if event == "execution_error":
            lines.append(f"node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}")
        elif event == "execution_interrupted":
            interrupted = True
            lines.append(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    detail = "; ".join(lines) if lines else "no error message in the history entry"
    raise ComfyExecutionError(f"prompt {prompt_id} failed: {detail}", prompt_id, interrupted)


def status_messages(entry: dict) -> list[tuple[str, dict]]:
    """``status.messages`` of a history entry as ``(event, data)`` pairs (malformed items dropped)."""
    out = []
    for msg in (entry.get("status") or {}).get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2:
            out.append((str(msg[0]), msg[1] if isinstance(msg[1], dict) else {}))
    return out
