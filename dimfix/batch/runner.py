"""Dispatch a batch of jobs (prompt × sweep combination) over one or more ComfyUI servers.

Each server has a worker thread that waits for the prompts it was given (websocket events, history
polling as the fallback), downloads the selected images and records the job in ``results.jsonl`` and
``manifest.json``. The dispatcher (the calling thread) hands the next pending job to the server with the
shortest queue (``exec_info.queue_remaining``, ties: fewer of our prompts, then the order of
``--server``) as long as that server holds fewer than ``depth`` of our prompts. A server that keeps
failing for ``down_after`` seconds is dropped and its unfinished prompts go back to the pending list.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from .client import (ComfyClient, ComfyConnectionError, ComfyError, ComfyExecutionError, ComfyPromptError,
                     ComfyTimeout, status_messages)
from .records import (BatchResult, Job, Options, history_verdict, no_images_message, result_dict, select_images,
                      short_label, timings)
from .store import Manifest, append_line, sha256_file, write_atomic
from .ws import EventMonitor

__all__ = ["Dispatcher"]


class _Server:
    def __init__(self, client: ComfyClient, name: str):
        self.client, self.name = client, name
        self.jobs: collections.deque[Job] = collections.deque()
        self.alive = True
        self.failing_since: float | None = None
        self.monitor: EventMonitor | None = None
        self.thread: threading.Thread | None = None


class Dispatcher:
    """Runs ``jobs`` over ``clients``; :meth:`run` returns the results in job order (see module docstring)."""

    def __init__(self, clients: list[ComfyClient], jobs: list[Job], opts: Options, out: Path, manifest: Manifest,
                 say: Callable[[str], None], display=None):
        self.servers = [_Server(c, c.base_url) for c in clients]
        self.jobs, self.opts, self.out, self.manifest, self.say = jobs, opts, out, manifest, say
        self.display = display
        self.cond = threading.Condition()
        self.pending: collections.deque[Job] = collections.deque()
        self.results: dict[int, BatchResult] = {}
        self.fatal: BaseException | None = None
        self.stopping = False
        self.halted = False  # stop_on_error: nothing new is dispatched
        self.client_id = uuid.uuid4().hex
        self._lines = threading.Lock()

    # ------------------------------------------------------------------------------------ bookkeeping

    def record(self, job: Job, res: BatchResult) -> None:
        with self.cond:
            self.results[job.order] = res
            if res.status not in ("ok", "skipped") and self.opts.stop_on_error:
                self.halted = True
            self.cond.notify_all()
        append_line(self.out, result_dict(res), self._lines)
        done = len(self.results)
        where = f" on {res.server}" if res.server else ""
        msg = (f"[{done}/{len(self.jobs)}] {res.status}{where} {res.seconds:.1f}s {len(res.files)} file(s)"
               f"{' (cached)' if res.cached else ''}: {short_label(job)}" + (f"\n    {res.error}" if res.error else ""))
        if self.display is not None:
            self.display.log(msg, finished=True)
        else:
            self.say(msg)

    def _failure(self, server: _Server, exc: Exception) -> bool:
        """Note a connection failure; True once the server has failed for ``down_after`` seconds."""
        now = time.monotonic()
        if server.failing_since is None:
            server.failing_since = now
        return now - server.failing_since >= self.opts.down_after

    def _call(self, server: _Server, fn, *args, **kwargs):
        """``fn(*args)`` retried while the server fails for less than ``down_after`` seconds."""
        while True:
            try:
                value = fn(*args, **kwargs)
                server.failing_since = None
                return value
            except ComfyConnectionError as exc:
                if self._failure(server, exc) or self.stopping:
                    raise
                time.sleep(min(1.0, max(0.05, self.opts.down_after / 10)))

    def server_down(self, server: _Server, exc: Exception) -> None:
        with self.cond:
            if not server.alive:
                return
            server.alive = False
            moved = list(server.jobs)
            server.jobs.clear()
            for job in moved:
                job.moved_from.append(server.name)
                job.prompt_id, job.server = None, None
            self.pending = collections.deque(sorted([*moved, *self.pending], key=lambda j: j.order))
            self.cond.notify_all()
        self.say(f"{server.name} stopped answering ({exc}); {len(moved)} unfinished prompt(s) go to the "
                 "other servers")

    # ------------------------------------------------------------------------------------ dispatch

    def run(self, todo: list[Job]) -> None:
        """Dispatch ``todo`` (jobs not already done) and wait for all of them; re-raises Ctrl-C and fatal errors."""
        self.pending.extend(todo)
        self._probe()
        for server in self.servers:
            if self.opts.websocket and server.alive:
                server.monitor = EventMonitor(server.client.base_url, self.client_id,
                                              on_event=self.display.event if self.display else None)
                if not server.monitor.start():
                    self.say(f"{server.name}: no websocket ({server.monitor.error}); polling /history instead")
                    server.monitor = None
            server.thread = threading.Thread(target=self._worker, args=(server,), daemon=True,
                                             name=f"batch {server.name}")
            server.thread.start()
        try:
            self._dispatch(len(todo))
        except BaseException as exc:
            self._abort(interrupted=isinstance(exc, KeyboardInterrupt))
            raise
        finally:
            with self.cond:
                self.stopping = True
                self.cond.notify_all()
            for server in self.servers:
                server.thread.join(timeout=5)
                if server.monitor is not None:
                    server.monitor.close()

    def _probe(self) -> None:
        """Drop the servers that do not answer at the start; raise when none does."""
        errors = []
        for server in self.servers:
            try:
                server.client.queue_remaining()
            except ComfyConnectionError as exc:
                server.alive = False
                errors.append(str(exc))
            except ComfyError:
                pass  # answers, without queue information: dispatch by our own count
        if len(errors) == len(self.servers):
            raise ComfyConnectionError("; ".join(errors))
        for message in errors:
            self.say(f"skipping a server: {message}")

    def _dispatch(self, count: int) -> None:
        while True:
            with self.cond:
                while True:
                    if self.fatal is not None:
                        raise self.fatal
                    busy = sum(len(s.jobs) for s in self.servers)
                    finished = len(self.results) - (len(self.jobs) - count)
                    if finished >= count or (self.halted and busy == 0):
                        return
                    live = [s for s in self.servers if s.alive]
                    if not live:
                        raise ComfyConnectionError(
                            "no ComfyUI server answers any more (" + ", ".join(s.name for s in self.servers)
                            + f"); {count - finished} prompt(s) not done; rerun the same command to resume")
                    free = [s for s in live if len(s.jobs) < self.opts.depth]
                    if self.pending and free and not self.halted:
                        break
                    self.cond.wait(0.25)
            server = self._pick(free)
            if server is None:  # the shortest queue is full: wait for one of its prompts to finish
                with self.cond:
                    self.cond.wait(max(0.05, self.opts.poll_interval))
                continue
            with self.cond:
                job = self.pending.popleft() if self.pending else None
            if job is not None:
                self._submit(server, job)

    def _pick(self, free: list[_Server]) -> _Server | None:
        """The live server with the shortest queue if it can take one more of our prompts, else None (wait).

        Servers that do not answer are skipped; one that has failed for ``down_after`` s and holds none of
        our prompts is dropped."""
        best = None
        for rank, server in enumerate(self.servers):
            if not server.alive:
                continue
            try:
                queued = server.client.queue_remaining()
                server.failing_since = None
            except ComfyConnectionError as exc:
                if self._failure(server, exc) and not server.jobs:
                    self.server_down(server, exc)
                continue
            except ComfyError:
                queued = len(server.jobs)
            key = (queued, len(server.jobs), rank)
            if best is None or key < best[0]:
                best = (key, server)
        return best[1] if best is not None and best[1] in free else None

    def _submit(self, server: _Server, job: Job) -> None:
        job.submitted = time.monotonic()
        try:
            pid = server.client.queue(job.graph, client_id=self.client_id, prompt_id=str(uuid.uuid4()))
        except ComfyConnectionError as exc:
            with self.cond:
                self.pending.appendleft(job)
            if self._failure(server, exc) and not server.jobs:
                self.server_down(server, exc)
            return
        except ComfyPromptError as exc:
            with self.cond:
                self.fatal = exc
            return
        with self.cond:
            job.prompt_id, job.server = pid, server
            server.jobs.append(job)
            self.cond.notify_all()
        if self.display is not None:
            self.display.submitted(pid, job, server.name)

    # ------------------------------------------------------------------------------------ workers

    def _worker(self, server: _Server) -> None:
        while True:
            with self.cond:
                while not server.jobs and server.alive and not self.stopping:
                    self.cond.wait(0.25)
                if not server.alive or self.stopping:
                    return
                job = server.jobs[0]
            try:
                res = self._complete(server, job)
            except ComfyConnectionError as exc:
                self.server_down(server, exc)
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the dispatcher (Ctrl-C included)
                with self.cond:
                    self.fatal = self.fatal or exc
                    self.cond.notify_all()
                return
            with self.cond:
                if self.stopping:  # Ctrl-C or a fatal error: the abort records what was in flight
                    return
                if job.server is not server:  # moved away meanwhile: another server records it
                    continue
                server.jobs.remove(job)
                job.server = None
            self.record(job, res)

    def _complete(self, server: _Server, job: Job) -> BatchResult:
        mon = server.monitor
        wake = mon.waiter(job.prompt_id) if mon is not None else None
        common = {"prompt_id": job.prompt_id, "server": server.name}
        try:
            entry = self._call(server, server.client.wait, job.prompt_id, timeout=self.opts.timeout,
                               poll_interval=self.opts.poll_interval, wake=wake)
        except ComfyTimeout as exc:
            return job.result("timeout", seconds=time.monotonic() - job.submitted, error=str(exc), **common)
        except ComfyExecutionError as exc:
            return job.result("error", seconds=time.monotonic() - job.submitted, error=str(exc), **common)
        t_done = time.monotonic()
        refs = select_images(entry, self.opts.fetch, self.opts.fetch_ids)
        if not refs:
            return job.result("error", seconds=t_done - job.submitted, error=no_images_message(entry, self.opts),
                              **common)
        try:
            files = self._download(server, job, refs)
        except (FileExistsError, ComfyError) as exc:
            if isinstance(exc, ComfyConnectionError):
                raise
            return job.result("error", seconds=time.monotonic() - job.submitted, error=str(exc), **common)
        fetch_s = time.monotonic() - t_done
        st = mon.state(job.prompt_id) if mon is not None else None
        cached_nodes = {str(n) for ev, d in status_messages(entry) if ev == "execution_cached"
                        for n in d.get("nodes") or []}
        self.manifest.mark_done(job.key, job.identity(), files, {
            "index": job.index, "server": server.name, "prompt_id": job.prompt_id,
            "verdict": history_verdict(entry)})
        return job.result("ok", files=[f["name"] for f in files], seconds=t_done + fetch_s - job.submitted,
                          cached=all(r["node_id"] in cached_nodes for r in refs),
                          timings=timings(entry, job, st, t_done, fetch_s), **common)

    def _download(self, server: _Server, job: Job, refs: list[dict]) -> list[dict]:
        names, counters = [], {}
        for ref in refs:
            n = counters[ref["node_id"]] = counters.get(ref["node_id"], -1) + 1
            ext = os.path.splitext(ref["filename"])[1].lower() or ".png"
            names.append(f"{job.key}_{re.sub(r'[^A-Za-z0-9.-]+', '-', ref['node_id'])}_{n}{ext}")
        owned = self.manifest.owned_names(job.key)
        for name in names:
            if (self.out / name).exists() and name not in owned and not self.opts.overwrite:
                raise FileExistsError(f"{self.out / name} exists and was not written by this batch "
                                      "(pass overwrite=True / --overwrite to replace it, or use another --out)")
        self.manifest.mark_partial(job.key, job.identity(), names)
        for stale in self.out.glob(f".{glob.escape(job.key)}_*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        files = []
        for ref, name in zip(refs, names):
            data = self._call(server, server.client.download, ref)
            write_atomic(self.out / name, data, overwrite=True)
            files.append({"name": name, "bytes": len(data), "sha256": sha256_file(self.out / name),
                          "node_id": ref["node_id"]})
        return files

    def _abort(self, interrupted: bool) -> None:
        """Remove our prompts from every server's queue, interrupt the running ones, note them as interrupted."""
        with self.cond:
            self.stopping = True
            in_flight = [(s, list(s.jobs)) for s in self.servers if s.jobs]
        for server, jobs in in_flight:
            try:
                server.client.delete_queued([j.prompt_id for j in jobs])
                for job in jobs:  # targeted: only the one that is running stops
                    server.client.interrupt(job.prompt_id)
            except ComfyError as exc:
                self.say(f"could not interrupt {server.name}: {exc}")
            if interrupted:
                for job in jobs:
                    self.record(job, job.result("interrupted", prompt_id=job.prompt_id, server=server.name,
                                                seconds=time.monotonic() - job.submitted,
                                                error="interrupted by the user"))
