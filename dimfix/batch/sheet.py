"""``index.html`` contact sheet of a batch output folder: one row per job, its images, its verdict.

Offline (no script, no remote resource), relative links, every text HTML-escaped. The verdict column
shows the analyzer's verdict section when the run's history exposed the report (a text output such as
Preview Any on the analyzer's ``report``); ``verdict_text`` (``--verdict FILE``) is shown above the table.
"""

from __future__ import annotations

import html
import urllib.parse
from pathlib import Path
from typing import Sequence

from .store import write_atomic

__all__ = ["SHEET_FILE", "SheetRow", "write_contact_sheet"]

SHEET_FILE = "index.html"

_STYLE = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{max-width:420px;display:block}"
          "figure{display:inline-block;margin:2px}figcaption{font-size:small;color:#555}"
          "pre{white-space:pre-wrap;font-size:small;margin:0}.bad{color:#b00}")


class SheetRow:
    """One row: the job's prompt, sweep values, seed, status, server, images ``(file name, caption)`` and
    verdict."""

    def __init__(self, index: int, prompt: str, sweep: dict, seed, status: str, server: str | None,
                 files: Sequence[tuple[str, str]], verdict: str | None = None, error: str | None = None):
        self.index, self.prompt, self.sweep, self.seed = index, prompt, dict(sweep), seed
        self.status, self.server, self.files = status, server, list(files)
        self.verdict, self.error = verdict, error


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _row(row: SheetRow) -> str:
    sweep = "<br>".join(f"{_e(k)} = {_e(v)}" for k, v in row.sweep.items())
    figures = "".join(
        f'<figure><a href="{_e(urllib.parse.quote(name))}"><img src="{_e(urllib.parse.quote(name))}" '
        f'alt="{_e(name)}" loading="lazy"></a><figcaption>{_e(caption)}</figcaption></figure>'
        for name, caption in row.files)
    status = _e(row.status) if row.status in ("ok", "skipped") else f'<span class="bad">{_e(row.status)}</span>'
    if row.error:
        status += f"<br><small>{_e(row.error)}</small>"
    verdict = f"<pre>{_e(row.verdict)}</pre>" if row.verdict else "—"
    return (f"<tr><td>{row.index}</td><td>{_e(row.prompt)}</td><td>{sweep or '—'}</td>"
            f"<td>{_e('' if row.seed is None else row.seed)}</td><td>{status}<br><small>{_e(row.server or '')}"
            f"</small></td><td>{figures or '—'}</td><td>{verdict}</td></tr>")


def write_contact_sheet(out_dir: str | Path, rows: Sequence[SheetRow], title: str = "Batch run",
                        verdict_text: str | None = None) -> Path:
    """Write (atomically, replacing the previous sheet) ``out_dir/index.html``; returns its path."""
    out = Path(out_dir)
    head = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{_e(title)}</h1>\n")
    parts = [head]
    if verdict_text:
        parts.append(f"<h2>Fix-table verdict</h2>\n<pre>{_e(verdict_text)}</pre>\n")
    ok = sum(r.status in ("ok", "skipped") for r in rows)
    parts.append(f"<p>{ok} of {len(rows)} rows done. Images link to the files in this folder.</p>\n")
    parts.append("<table>\n<tr><th>#</th><th>prompt</th><th>sweep</th><th>seed</th><th>status / server</th>"
                 "<th>images</th><th>verdict</th></tr>\n")
    parts.extend(_row(r) + "\n" for r in rows)
    parts.append("</table>\n</body></html>\n")
    path = out / SHEET_FILE
    write_atomic(path, "".join(parts).encode("utf-8"), overwrite=True)
    return path
