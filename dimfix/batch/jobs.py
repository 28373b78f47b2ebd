""":func:`run_batch`: build the jobs (prompts × sweep combinations), resume from the manifest, dispatch."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any, Callable, Sequence

from .client import ComfyClient
from .graph import (Sweep, WorkflowError, add_save_nodes, apply_sweeps, find_nodes, node_label, node_title,
                    parse_sweep, set_input, sweep_combinations, validate_api_workflow)
from .records import BatchResult, Job, Options, extract_verdict
from .runner import Dispatcher
from .sheet import SheetRow, write_contact_sheet
from .store import Manifest, slugify

__all__ = ["run_batch", "MAX_SEED"]

MAX_SEED = 2**32 - 1


def _fetch_ids(graph: dict, fetch: str, fetch_nodes: Sequence[str]) -> frozenset | None:
    if fetch not in ("output", "all"):
        raise ValueError(f"fetch must be 'output' or 'all', got {fetch!r}")
    if not fetch_nodes:
        return None
    ids = set()
    for sel in fetch_nodes:
        found = find_nodes(graph, sel)
        if not found:
            raise WorkflowError(f"fetch node {sel!r}: no node matches (by id, _meta.title or class_type); nodes: "
                                + ", ".join(node_label(graph, nid) for nid in graph))
        ids.update(found)
    return frozenset(ids)


def _base_seed(manifest: Manifest, seed: int | None, seed_mode: str, say) -> int:
    recorded = manifest.run.get("base_seed")
    if seed is None and isinstance(recorded, int) and manifest.run.get("seed_mode") == seed_mode:
        say(f"resuming with the recorded base seed {recorded}")
        return recorded
    base = int(seed) if seed is not None else secrets.randbelow(MAX_SEED)
    if seed is None:
        say(f"random base seed {base}")
    return base


def _make_jobs(graph: dict, prompts: list[str], sweeps: list[Sweep], prompt_sel, prompt_input: str,
               seed_sel, seed_input: str, base_seed: int | None, seed_mode: str) -> list[Job]:
    width = max(3, len(str(len(prompts) - 1)))
    combos = sweep_combinations(sweeps)
    cwidth = len(str(len(combos) - 1))
    jobs = []
    for index, prompt in enumerate(prompts):
        g = set_input(graph, prompt_sel, prompt_input, prompt, multiple=True)
        this_seed = None
        if base_seed is not None:
            this_seed = (base_seed + index) % (MAX_SEED + 1) if seed_mode == "increment" else base_seed
            g = set_input(g, seed_sel, seed_input, this_seed, multiple=True)
        for c, combo in enumerate(combos):
            key = f"{index:0{width}d}_{slugify(prompt)}"
            if sweeps:
                key += f"_s{c:0{cwidth}d}-{slugify('-'.join(map(str, combo)), 30)}"
            sweep = {s.label: v for s, v in zip(sweeps, combo)}
            jobs.append(Job(len(jobs), index, prompt, sweep, this_seed, apply_sweeps(g, sweeps, combo), key))
    return jobs


def _plan(jobs: list[Job], manifest: Manifest, out: Path, overwrite: bool, say) -> tuple[list[Job], dict]:
    """(jobs to run, {order: result} of jobs not to run) under the manifest's resume rule."""
    todo, decided = [], {}
    names = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    for job in jobs:
        state, reason = manifest.status(job.key, job.identity())
        if state == "done" and not overwrite:
            files = [f["name"] for f in manifest.entry(job.key)["files"]]
            decided[job.order] = job.result("skipped", files=files)
            continue
        pattern = re.compile(re.escape(job.key) + r"_[^_]+_\d+\.[^.]+$")
        foreign = sorted(n for n in names if pattern.match(n) and n not in manifest.owned_names(job.key))
        if not overwrite and (state == "conflict" or foreign):
            why = reason if state == "conflict" else \
                f"{', '.join(foreign[:3])} exist(s) but not in {manifest.path.name}"
            decided[job.order] = job.result("error", error=f"not run: {why}; pass overwrite=True / --overwrite "
                                                           "to redo it, or use another --out")
            continue
        if state == "redo" and reason != "not run yet":
            say(f"redoing {job.key}: {reason}")
        todo.append(job)
    return todo, decided


def run_batch(
    client: ComfyClient | Sequence[ComfyClient],
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
    *,
    fetch: str = "output",
    fetch_nodes: Sequence[str] = (),
    save_nodes: Sequence[str] = (),
    sweeps: Sequence[str | Sweep] = (),
    verdict_text: str | None = None,
    websocket: bool = True,
    depth: int = 2,
    down_after: float = 20.0,
    display: Any = None,
) -> list[BatchResult]:
    """Run ``graph`` once per prompt × sweep combination over the server(s); return the results in job order.

    See the package docstring for files, seeds, resume, fetch selection and exit behaviour. A graph the
    server rejects raises :class:`ComfyPromptError` at once; execution errors and timeouts are recorded and
    the batch goes on unless ``stop_on_error``; when no server answers any more
    :class:`ComfyConnectionError` is raised after the finished jobs were recorded; Ctrl-C removes our
    prompts from the queues, interrupts them, records them as ``interrupted`` and re-raises.
    """
    graph = validate_api_workflow(graph, "graph")
    clients = [client] if isinstance(client, ComfyClient) else list(client)
    if not clients or seed_mode not in ("increment", "fixed") or depth < 1:
        raise ValueError("run_batch: give at least one client, seed_mode 'increment' or 'fixed' and depth >= 1 "
                         f"(got {len(clients)} client(s), {seed_mode!r}, depth {depth})")
    if len({c.base_url for c in clients}) != len(clients):
        raise ValueError("run_batch: the same server is given twice: " + ", ".join(c.base_url for c in clients))
    prompts = list(prompts)
    if not prompts:
        raise ValueError("run_batch: no prompts given")
    say = log or (lambda _msg: None)
    set_input(graph, prompt_selector, prompt_input, "", multiple=True)  # selectors fail before anything is queued
    if seed_selector is not None:
        set_input(graph, seed_selector, seed_input, 0, multiple=True)
    parsed = [s if isinstance(s, Sweep) else parse_sweep(graph, s) for s in sweeps]
    graph, saves = add_save_nodes(graph, save_nodes)
    fetch_ids = _fetch_ids(graph, fetch, fetch_nodes)
    opts = Options(fetch, fetch_ids if fetch_ids is None else fetch_ids | set(saves), overwrite, float(timeout),
                   float(poll_interval), stop_on_error, websocket, int(depth), float(down_after))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    base_seed = None
    if seed_selector is not None:
        base_seed = _base_seed(manifest, seed, seed_mode, say)
        manifest.set_run(base_seed=base_seed, seed_mode=seed_mode)
    jobs = _make_jobs(graph, prompts, parsed, prompt_selector, prompt_input, seed_selector, seed_input,
                      base_seed, seed_mode)
    todo, decided = _plan(jobs, manifest, out, overwrite, say)
    dispatcher = Dispatcher(clients, jobs, opts, out, manifest, say, display)
    for job in jobs:
        if job.order in decided:
            dispatcher.record(job, decided[job.order])
    try:
        if todo:
            dispatcher.run(todo)
    finally:
        if display is not None:
            display.close()
        _sheet(out, jobs, dispatcher.results, manifest, verdict_text)
    return [dispatcher.results[j.order] for j in jobs if j.order in dispatcher.results]


def _caption(graph: dict, file: dict) -> str:
    return f"{node_title(graph, file['node_id'])} · {file['name']}" if file.get("node_id") else file["name"]


def _sheet(out: Path, jobs: list[Job], results: dict, manifest: Manifest, verdict_text: str | None) -> None:
    rows = []
    for job in jobs:
        res = results.get(job.order)
        entry = manifest.entry(job.key) or {}
        done = entry.get("state") == "done" and res is not None and res.status in ("ok", "skipped")
        rows.append(SheetRow(job.index, job.prompt, job.sweep, job.seed, res.status if res else "not run",
                             entry.get("server") if done else (res.server if res else None),
                             [(f["name"], _caption(job.graph, f)) for f in entry.get("files") or []] if done else [],
                             entry.get("verdict") if done else None, None if res is None else res.error))
    table_verdict = (extract_verdict(verdict_text) or verdict_text.strip()[:4000]) if verdict_text else None
    write_contact_sheet(out, rows, title=f"Batch run: {out.name}", verdict_text=table_verdict)
