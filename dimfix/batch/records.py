"""Records of a batch: jobs, results, the images to fetch, the verdict and timings of a history entry."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .client import ComfyClient, status_messages

__all__ = ["BatchResult", "Job", "Options", "select_images", "extract_verdict", "history_verdict", "timings",
           "no_images_message", "short_label", "result_dict"]


@dataclass
class BatchResult:
    """Outcome of one job: ``status`` is ok, skipped, error, timeout or interrupted."""

    index: int
    prompt: str
    status: str
    prompt_id: str | None = None
    seed: int | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None
    server: str | None = None
    sweep: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    moved_from: list[str] = field(default_factory=list)


@dataclass
class Job:
    order: int
    index: int
    prompt: str
    sweep: dict
    seed: int | None
    graph: dict
    key: str
    prompt_id: str | None = None
    submitted: float = 0.0
    server: Any = None
    moved_from: list[str] = field(default_factory=list)

    def identity(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "sweep": self.sweep}

    def result(self, status: str, **kw: Any) -> BatchResult:
        return BatchResult(self.index, self.prompt, status, seed=self.seed, sweep=self.sweep,
                           moved_from=list(self.moved_from), **kw)


@dataclass
class Options:
    fetch: str = "output"
    fetch_ids: frozenset | None = None
    overwrite: bool = False
    timeout: float = 600.0
    poll_interval: float = 0.5
    stop_on_error: bool = False
    websocket: bool = True
    depth: int = 2
    down_after: float = 20.0


def select_images(entry: dict, fetch: str = "output", node_ids: frozenset | None = None) -> list[dict]:
    """The image references of a history entry to download: those of ``node_ids`` when given, else every
    ``type == "output"`` image (Save nodes; ``fetch="output"``) or every image (``fetch="all"``)."""
    refs = ComfyClient.outputs_images(entry)
    if node_ids is not None:
        return [r for r in refs if r["node_id"] in node_ids]
    return refs if fetch == "all" else [r for r in refs if r["type"] == "output"]


_VERDICT_RE = re.compile(r"\*\*Verdict: (PASS|FAIL)\*\*")


def extract_verdict(text: str) -> str | None:
    """The verdict section (criteria table and PASS/FAIL line) of an analyzer report, or None."""
    match = _VERDICT_RE.search(text or "")
    if not match:
        return None
    start = text.rfind("## Verdict", 0, match.start())
    start = text.rfind("| Criterion", 0, match.start()) if start < 0 else start
    return text[max(start, 0):match.end()].strip()


def history_verdict(entry: dict) -> str | None:
    for out in (entry.get("outputs") or {}).values():
        for text in (out or {}).get("text") or []:
            found = extract_verdict(text) if isinstance(text, str) else None
            if found:
                return found
    return None


def timings(entry: dict, job: Job, st, t_done: float, fetch_s: float) -> dict:
    stamps = {ev: d["timestamp"] for ev, d in status_messages(entry)
              if isinstance(d.get("timestamp"), (int, float))}
    end = stamps.get("execution_success", stamps.get("execution_error"))
    out = {"total_s": round(t_done + fetch_s - job.submitted, 3), "fetch_s": round(fetch_s, 3)}
    if "execution_start" in stamps and end is not None:
        out["execution_s"] = round((end - stamps["execution_start"]) / 1000.0, 3)
    elif st is not None and st.started is not None and st.finished_at is not None:
        out["execution_s"] = round(st.finished_at - st.started, 3)
    if st is not None and st.started is not None:
        out["wait_s"] = round(max(0.0, st.started - job.submitted), 3)
    return out


def no_images_message(entry: dict, opts: Options) -> str:
    every = ComfyClient.outputs_images(entry)
    if not every:
        return "the workflow produced no images (does it have a Save/Preview Image node?)"
    kinds = sorted({f"node {r['node_id']} ({r['type']})" for r in every})
    which = "the --fetch-node nodes" if opts.fetch_ids is not None else f"--fetch {opts.fetch}"
    return f"no image matches {which}; the workflow produced images of {', '.join(kinds)}"


def short_label(job: Job) -> str:
    sweep = " ".join(f"{k}={v}" for k, v in job.sweep.items())
    return job.prompt[:60] + (f" [{sweep}]" if sweep else "")


def result_dict(res: BatchResult) -> dict:
    return asdict(res)
