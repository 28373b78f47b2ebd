"""The one-line live progress display: ``[k/N] server: node title step v/max | …`` rewritten in place.

It is shown only when enabled and the stream is a terminal; log lines clear it first.
"""

from __future__ import annotations

import shutil
import sys
import threading
from typing import TextIO

from .graph import node_title


__all__ = ["LiveLine"]


class LiveLine:
    """Live progress on ``stream`` (default stdout); :meth:`log` prints a line to ``log_stream`` (stderr)."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None,
                 log_stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stdout
        self.log_stream = log_stream or sys.stderr
        self.total = total
        self.quiet = quiet
        self.live = enabled and not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple] = {}  # prompt_id -> (job, server)
        self._state: dict[str, str] = {}  # server -> text
        self._shown = False

    def submitted(self, prompt_id: str, job, server: str) -> None:
        with self._lock:
            self._jobs[prompt_id] = (job, server)

    def event(self, prompt_id: str, kind: str, st) -> None:
        with self._lock:
            if prompt_id not in self._jobs or not self.live:
                return
            job, server = self._jobs[prompt_id]
            if st.finished.is_set():
                self._state.pop(server, None)
            else:
                node = node_title(job.graph, st.node) if st.node else "queued"
                step = f" {st.value}/{st.max}" if st.value is not None and st.max else ""
                self._state[server] = f"#{job.order + 1} {node}{step}"
            self._draw()

    def _draw(self) -> None:
        parts = [f"{server.split('//')[-1]}: {text}" for server, text in sorted(self._state.items())]
        line = f"[{self.done}/{self.total} done] " + " | ".join(parts)
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + line[:width])
        self.stream.flush()
        self._shown = True

    def log(self, message: str, finished: bool = False) -> None:
        """Print ``message`` (not under ``quiet``); ``finished`` counts one more job done."""
        with self._lock:
            self.done += int(finished)
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False
            if not self.quiet:
                print(message, file=self.log_stream)
            if self.live and self._state:
                self._draw()

    def close(self) -> None:
        """Clear the line and stop drawing (later log lines still print)."""
        with self._lock:
            self.live = False
            self._state.clear()
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False
