"""Run an API-format ComfyUI workflow over many prompts through the HTTP API.

Standard library only: ``python -m dimfix.batch`` works from the pack folder with any Python ≥ 3.10.

    python -m dimfix.batch --server http://127.0.0.1:8188 --workflow workflows/api/X.json \\
        --prompt-node Prompt --seed-node KSampler --seed 42 --out out/run1 [--prompts FILE] [--limit N]

For each prompt the text input of every node matching ``--prompt-node`` (a node id, a ``_meta.title`` or a
``class_type``) is replaced, the graph is queued (``POST /prompt``), ``GET /history/{id}`` is polled until
the prompt is done, and every image of the outputs is downloaded (``GET /view``) to
``OUT/<index>_<slug>_<node>_<n>.<ext>``. ``OUT/results.jsonl`` gets one JSON line per prompt.

Seeds: with ``--seed N`` the seed input of the ``--seed-node`` nodes is ``N + index`` (``--seed-mode
increment``, default: every submission differs, reproducible) or ``N`` for all prompts (``--seed-mode
fixed``); with ``--seed-node`` but no ``--seed`` a random base seed is drawn and recorded. Without
``--seed-node`` the workflow's own seed is kept. ComfyUI caches identical submissions: the prompt text
already makes each submission of a run unique, and a ``client_id`` is always sent so that a cached
re-submit still reports its (earlier) images; such results are marked ``"cached": true``.

Existing files are never overwritten unless ``overwrite=True``: a prompt whose files already exist in
``OUT`` is skipped (``status "skipped"``), so an interrupted run can be resumed. Images are written
atomically (temporary file + ``os.replace``). Ctrl-C removes the current prompt from the server queue,
sends ``POST /interrupt`` and stops.

Exit codes of :func:`main`: 0 all prompts done (or skipped), 1 some prompts failed, 2 bad arguments,
workflow, corpus or a graph the server rejected, 3 server unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import secrets
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .corpus import default_corpus_path, load_corpus

__all__ = [
    "ComfyError", "ComfyConnectionError", "ComfyPromptError", "ComfyExecutionError", "ComfyTimeout",
    "WorkflowError", "ComfyClient", "BatchResult", "load_api_workflow", "validate_api_workflow",
    "find_nodes", "set_input", "slugify", "run_batch", "main",
]

RESULTS_FILE = "results.jsonl"
_MAX_SEED = 2**32 - 1


class ComfyError(RuntimeError):
    """Base class of errors reported by the ComfyUI server or while talking to it."""


class ComfyConnectionError(ComfyError):
    """The server could not be reached."""


class ComfyPromptError(ComfyError):
    """``POST /prompt`` rejected the graph (HTTP 400 or non-empty ``node_errors``)."""

    def __init__(self, message: str, node_errors: dict | None = None):
        super().__init__(message)
        self.node_errors = node_errors or {}


class ComfyExecutionError(ComfyError):
    """The prompt ran and failed (``status.status_str == "error"``), or was interrupted."""

    def __init__(self, message: str, prompt_id: str = "", interrupted: bool = False):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.interrupted = interrupted


class ComfyTimeout(ComfyError, TimeoutError):
    """The prompt did not finish in time."""


class WorkflowError(ValueError):
    """The workflow file or a node selector is not usable."""


# --------------------------------------------------------------------------------------------- client


def _format_node_errors(node_errors: dict) -> str:
    parts = []
    for node_id, info in sorted(node_errors.items(), key=lambda kv: str(kv[0])):
        info = info if isinstance(info, dict) else {"errors": [info]}
        errs = info.get("errors") or []
        msgs = []
        for e in errs:
            if isinstance(e, dict):
                text = e.get("message", "")
                details = e.get("details")
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

    def queue(self, graph: dict, client_id: str | None = None) -> str:
        """``POST /prompt``; returns the prompt id. Raises :class:`ComfyPromptError` on rejection."""
        body: dict[str, Any] = {"prompt": graph}
        if client_id:
            body["client_id"] = client_id
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
            raise ComfyPromptError(f"ComfyUI rejected the workflow (HTTP {status}): {msg}", node_errors)
        if not isinstance(data, dict) or "prompt_id" not in data:
            raise ComfyError(f"POST /prompt: unexpected answer {raw[:200]!r}")
        node_errors = data.get("node_errors") or {}
        if node_errors:  # some outputs valid, others not: the server queued a partial graph
            raise ComfyPromptError(
                "ComfyUI reported node errors (only part of the workflow would run):\n  "
                + _format_node_errors(node_errors), node_errors)
        return str(data["prompt_id"])

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of ``prompt_id`` (``{"outputs", "status", ...}``) or None while not finished."""
        data = self._json("GET", "/history/" + urllib.parse.quote(str(prompt_id), safe=""))
        if isinstance(data, dict) and prompt_id in data:
            return data[prompt_id]
        return None

    def wait(self, prompt_id: str, timeout: float = 600.0, poll_interval: float = 0.5) -> dict:
        """Poll the history until the prompt is done; raise on execution error, interruption or timeout."""
        deadline = time.monotonic() + float(timeout)
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                _raise_for_status(prompt_id, entry)
                return entry
            if time.monotonic() >= deadline:
                raise ComfyTimeout(f"prompt {prompt_id} did not finish within {timeout:g} s "
                                   "(still queued or running on the server)")
            time.sleep(max(0.0, float(poll_interval)))

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
            raise ComfyError(f"GET /view {query} failed with HTTP {status}")
        return raw

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt`` (only ``prompt_id`` when given)."""
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def delete_queued(self, prompt_ids: Sequence[str]) -> None:
        """Remove pending prompts from the server queue (``POST /queue {"delete": [...]}``)."""
        self._request("POST", "/queue", {"delete": list(prompt_ids)})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """``POST /free``: unload models / free cached memory on the server."""
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})


def _raise_for_status(prompt_id: str, entry: dict) -> None:
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return
    lines, interrupted = [], False
    for msg in status.get("messages") or []:
        if not isinstance(msg, (list, tuple)) or len(msg) != 2:
            continue
        event, data = msg
        data = data if isinstance(data, dict) else {}
        if event == "execution_error":
            lines.append(f"node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type', 'Error')}: {data.get('exception_message', '').strip()}")
        elif event == "execution_interrupted":
            interrupted = True
            lines.append(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    detail = "; ".join(lines) if lines else "no error message in the history entry"
    raise ComfyExecutionError(f"prompt {prompt_id} failed: {detail}", prompt_id, interrupted)


def _cached_nodes(entry: dict) -> set[str]:
    for msg in (entry.get("status") or {}).get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == "execution_cached":
            return {str(n) for n in (msg[1] or {}).get("nodes") or []}
    return set()


# --------------------------------------------------------------------------------------------- graph


def validate_api_workflow(data: Any, source: str = "workflow") -> dict:
    """Return the API-format graph in ``data`` or raise :class:`WorkflowError` (UI format, not a graph)."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]  # a saved ``POST /prompt`` body
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{source}: expected an API-format workflow (a JSON object of nodes), "
                            f"got {type(data).__name__}{' (empty)' if not data else ''}")
    if "nodes" in data and ("links" in data or isinstance(data["nodes"], list)):
        raise WorkflowError(f"{source}: this is a UI workflow; export with 'Save (API)' "
                            "(ComfyUI menu Workflow → Export (API)) and pass that file")
    bad = [str(k) for k, v in data.items() if not isinstance(v, dict) or "class_type" not in v]
    if bad:
        raise WorkflowError(f"{source}: this is a UI workflow or not a workflow; export with 'Save (API)'. "
                            f"Entries without class_type: {', '.join(bad[:8])}")
    for node_id, node in data.items():
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{source}: node {node_id} has 'inputs' that is not an object")
    return data


def load_api_workflow(path: str | Path) -> dict:
    """Read an API-format workflow JSON file (rejects UI-format files with instructions)."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"workflow file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise WorkflowError(f"{path}: not valid JSON ({exc})") from exc
    return validate_api_workflow(data, source=str(path))


def _describe(graph: dict) -> str:
    items = []
    for node_id, node in graph.items():
        title = (node.get("_meta") or {}).get("title")
        items.append(f"{node_id}: {node.get('class_type')}" + (f" '{title}'" if title else ""))
    return ", ".join(items)


def find_nodes(graph: dict, selector: str | int) -> list[str]:
    """Node ids matching ``selector``: an exact node id, else ``_meta.title`` matches, else class_type matches."""
    sel = str(selector)
    if sel in graph:
        return [sel]
    by_title = [nid for nid, n in graph.items() if (n.get("_meta") or {}).get("title") == sel]
    if by_title:
        return by_title
    return [nid for nid, n in graph.items() if n.get("class_type") == sel]


def set_input(graph: dict, selector: str | int, name: str, value: Any, multiple: bool = False) -> dict:
    """Return a NEW graph with input ``name`` = ``value`` on the node(s) matching ``selector``.

    Errors (:class:`WorkflowError`, listing the candidates): no node matches; several match and
    ``multiple`` is False; a matched node has no such input; the input is a link to another node.
    """
    ids = find_nodes(graph, selector)
    if not ids:
        raise WorkflowError(f"no node matches {selector!r} (by id, _meta.title or class_type); "
                            f"nodes: {_describe(graph)}")
    if len(ids) > 1 and not multiple:
        raise WorkflowError(f"{selector!r} is ambiguous: it matches nodes "
                            f"{_describe({i: graph[i] for i in ids})}; use a node id or a unique title")
    new = copy.deepcopy(graph)
    for nid in ids:
        inputs = new[nid].setdefault("inputs", {})
        if name not in inputs:
            raise WorkflowError(f"node {nid} ({new[nid].get('class_type')}) has no input {name!r}; "
                                f"inputs: {', '.join(sorted(inputs)) or 'none'}")
        current = inputs[name]
        if isinstance(current, list) and len(current) == 2 and isinstance(current[1], int):
            raise WorkflowError(f"input {name!r} of node {nid} ({new[nid].get('class_type')}) is connected to "
                                f"node {current[0]}; select that node instead")
        inputs[name] = copy.deepcopy(value)
    return new


# --------------------------------------------------------------------------------------------- batch


def slugify(text: str, max_len: int = 40) -> str:
    """ASCII file-name slug of a prompt (``"A cat, asleep!"`` → ``"a-cat-asleep"``)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


@dataclass
class BatchResult:
    """Outcome of one prompt: ``status`` is ok, cached, skipped, error, timeout or interrupted."""

    index: int
    prompt: str
    status: str
    prompt_id: str | None = None
    seed: int | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def _write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _append_result(out_dir: Path, result: BatchResult) -> None:
    with open(out_dir / RESULTS_FILE, "a", encoding="utf-8") as fh:
        fh.write(result.to_json() + "\n")
        fh.flush()


def run_batch(
    client: ComfyClient,
    graph: dict,
    prompts: Sequence[str],
    prompt_selector: str | int,
    prompt_input: str = "text",
    seed_selector: str | int | None = None,
    seed: int | None = None,
    out_dir: str | Path = "batch_out",
    overwrite: bool = False,
    seed_input: str = "seed",
    seed_mode: str = "increment",
    timeout: float = 600.0,
    poll_interval: float = 0.5,
    stop_on_error: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[BatchResult]:
    """Queue ``graph`` once per prompt, wait, download its images, log ``results.jsonl`` (see module doc).

    A graph the server rejects raises :class:`ComfyPromptError` at once (it would fail for every prompt);
    an execution error or a timeout is recorded and the batch continues unless ``stop_on_error``.
    Ctrl-C: the current prompt is deleted from the queue and interrupted, an ``interrupted`` line is
    written and ``KeyboardInterrupt`` propagates.
    """
    graph = validate_api_workflow(graph, "graph")
    if seed_mode not in ("increment", "fixed"):
        raise ValueError(f"seed_mode must be 'increment' or 'fixed', got {seed_mode!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("run_batch: no prompts given")
    say = log or (lambda _msg: None)
    # validate selectors once, before anything is queued
    set_input(graph, prompt_selector, prompt_input, "", multiple=True)
    base_seed = None
    if seed_selector is not None:
        set_input(graph, seed_selector, seed_input, 0, multiple=True)
        base_seed = int(seed) if seed is not None else secrets.randbelow(_MAX_SEED)
        if seed is None:
            say(f"random base seed {base_seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(prompts) - 1)))
    client_id = uuid.uuid4().hex
    results: list[BatchResult] = []
    for index, prompt in enumerate(prompts):
        stem = f"{index:0{width}d}_{slugify(prompt)}_"
        g = set_input(graph, prompt_selector, prompt_input, prompt, multiple=True)
        this_seed = None
        if base_seed is not None:
            this_seed = (base_seed + index) % (_MAX_SEED + 1) if seed_mode == "increment" else base_seed
            g = set_input(g, seed_selector, seed_input, this_seed, multiple=True)
        existing = sorted(p.name for p in out.glob(stem + "*") if not p.name.startswith("."))
        if existing and not overwrite:
            res = BatchResult(index, prompt, "skipped", seed=this_seed, files=existing,
                              error="files exist; pass overwrite=True / --overwrite to redo")
            say(f"[{index + 1}/{len(prompts)}] skipped (files exist): {prompt[:60]}")
            _append_result(out, res)
            results.append(res)
            continue
        t0 = time.monotonic()
        prompt_id = None
        try:
            prompt_id = client.queue(g, client_id=client_id)
            entry = client.wait(prompt_id, timeout=timeout, poll_interval=poll_interval)
            refs = client.outputs_images(entry)
            cached_nodes = _cached_nodes(entry)
            files = []
            counters: dict[str, int] = {}
            for ref in refs:
                n = counters.get(ref["node_id"], 0)
                counters[ref["node_id"]] = n + 1
                ext = os.path.splitext(ref["filename"])[1].lower() or ".png"
                node_tag = re.sub(r"[^A-Za-z0-9.-]+", "-", ref["node_id"])
                name = f"{stem}{node_tag}_{n}{ext}"
                _write_atomic(out / name, client.download(ref), overwrite)
                files.append(name)
            cached = bool(refs) and all(r["node_id"] in cached_nodes for r in refs)
            status = "ok" if refs else "error"
            res = BatchResult(index, prompt, status, prompt_id, this_seed, files, time.monotonic() - t0, cached,
                              None if refs else "the workflow produced no images (does it have a Save/Preview "
                                                "Image node?)")
        except KeyboardInterrupt:
            if prompt_id is not None:
                try:
                    client.delete_queued([prompt_id])
                    client.interrupt()
                except ComfyError as exc:
                    say(f"could not interrupt the server: {exc}")
            res = BatchResult(index, prompt, "interrupted", prompt_id, this_seed, [], time.monotonic() - t0,
                              error="interrupted by the user")
            _append_result(out, res)
            results.append(res)
            raise
        except ComfyTimeout as exc:
            res = BatchResult(index, prompt, "timeout", prompt_id, this_seed, [], time.monotonic() - t0,
                              error=str(exc))
        except (ComfyExecutionError, FileExistsError) as exc:
            res = BatchResult(index, prompt, "error", prompt_id, this_seed, [], time.monotonic() - t0,
                              error=str(exc))
        _append_result(out, res)
        results.append(res)
        say(f"[{index + 1}/{len(prompts)}] {res.status} {res.seconds:.1f}s {len(res.files)} file(s)"
            f"{' (cached)' if res.cached else ''}: {prompt[:60]}" + (f"\n    {res.error}" if res.error else ""))
        if res.status not in ("ok",) and stop_on_error:
            break
    return results


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dimfix.batch",
        description="Run an API-format ComfyUI workflow once per prompt and download the images.")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (ComfyUI: Export (API))")
    p.add_argument("--prompts", default=None,
                   help="prompt file, one per line, '#' comments (default: the pack's calibration corpus)")
    p.add_argument("--prompt-node", required=True,
                   help="node id, _meta.title or class_type of the text node(s); every match is set")
    p.add_argument("--prompt-input", default="text", help="input name of the prompt text (default %(default)s)")
    p.add_argument("--seed-node", default=None, help="node id, title or class_type holding the seed")
    p.add_argument("--seed-input", default="seed", help="input name of the seed (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: random, recorded)")
    p.add_argument("--seed-mode", choices=("increment", "fixed"), default="increment",
                   help="seed per prompt: base + index (default) or the same seed for all")
    p.add_argument("--out", required=True, help="output folder (results.jsonl + images)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--overwrite", action="store_true", help="redo prompts whose files exist and replace them")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per prompt (default %(default)s)")
    p.add_argument("--poll", type=float, default=0.5, help="history polling interval in s (default %(default)s)")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failed prompt")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)

    def err(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr)

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    if args.limit is not None and args.limit < 1:
        err(f"--limit must be >= 1, got {args.limit}")
        return 2
    if args.seed_node is None and args.seed is not None:
        err("--seed needs --seed-node (the node whose seed input is set)")
        return 2
    try:
        graph = load_api_workflow(args.workflow)
        corpus = load_corpus(args.prompts if args.prompts else default_corpus_path())
        for note in corpus.notes:
            if log:
                log(note)
        prompts = corpus.prompts[: args.limit] if args.limit else corpus.prompts
        client = ComfyClient(args.server, timeout=max(30.0, args.poll * 4))
        results = run_batch(client, graph, prompts, args.prompt_node, args.prompt_input, args.seed_node,
                            args.seed, args.out, args.overwrite, seed_input=args.seed_input,
                            seed_mode=args.seed_mode, timeout=args.timeout, poll_interval=args.poll,
                            stop_on_error=args.stop_on_error, log=log)
    except KeyboardInterrupt:
        err("interrupted; the current prompt was removed from the server queue and interrupted")
        return 130
    except ComfyConnectionError as exc:
        err(str(exc))
        return 3
    except (WorkflowError, ComfyPromptError, ValueError, FileNotFoundError) as exc:
        err(str(exc))
        return 2
    except ComfyError as exc:
        err(str(exc))
        return 1
    failed = [r for r in results if r.status not in ("ok", "skipped")]
    if log:
        log(f"{len(results) - len(failed)}/{len(results)} prompts done, results in "
            f"{Path(args.out) / RESULTS_FILE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
