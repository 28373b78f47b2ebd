"""The output folder of a batch run: file names, atomic writes, ``results.jsonl`` and ``manifest.json``.

Resume rule (:meth:`Manifest.status`): a job (one prompt × sweep combination) is done only when
its manifest entry says ``done``, was made with the same prompt, seed and sweep values, and every file
it lists exists with the recorded size and SHA-256. The entry is written (atomically) only after all of
the job's downloads finished; before the first download a ``partial`` entry names the files to come, so
a rerun knows which leftovers it may replace. Any other existing file is never replaced without
``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import unicodedata
import uuid
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_FILE", "MANIFEST_FILE", "slugify", "write_atomic", "sha256_file", "Manifest"]

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "manifest.json"
_VERSION = 1


def slugify(text: str, max_len: int = 40) -> str:
    """ASCII file-name slug of a prompt (``"A cat, asleep!"`` → ``"a-cat-asleep"``)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``; refuse to replace unless
    ``overwrite``."""
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def append_line(out_dir: Path, obj: dict, lock: threading.Lock) -> None:
    """Append one JSON line to ``results.jsonl``."""
    with lock, open(out_dir / RESULTS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        fh.flush()


class Manifest:
    """``manifest.json`` of an output folder: run settings and one entry per job key (thread-safe)."""

    def __init__(self, out_dir: Path):
        self.out = Path(out_dir)
        self.path = self.out / MANIFEST_FILE
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"version": _VERSION, "run": {}, "jobs": {}}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"{self.path}: not valid JSON ({exc}); move it away to start a new run "
                                 "in this folder") from exc
            if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(
                    data.get("jobs"), dict):
                raise ValueError(f"{self.path}: not a batch manifest of version {_VERSION}; use another --out")
            self.data = data

    @property
    def run(self) -> dict:
        return self.data.setdefault("run", {})

    def entry(self, key: str) -> dict | None:
        with self.lock:
            return self.data["jobs"].get(key)

    def _save(self) -> None:
        raw = json.dumps(self.data, ensure_ascii=False, indent=1).encode("utf-8")
        write_atomic(self.path, raw, overwrite=True)

    def set_run(self, **settings: Any) -> None:
        with self.lock:
            self.run.update(settings)
            self._save()

    def mark_partial(self, key: str, identity: dict, names: list[str]) -> None:
        """Before the downloads: the files this job is about to write."""
        with self.lock:
            self.data["jobs"][key] = {**identity, "state": "partial", "files": [{"name": n} for n in names]}
            self._save()

    def mark_done(self, key: str, identity: dict, files: list[dict], extra: dict) -> None:
        """After every download: files with ``name``, ``bytes``, ``sha256`` (and ``node_id``)."""
        with self.lock:
            self.data["jobs"][key] = {**identity, **extra, "state": "done", "files": files}
            self._save()

    def owned_names(self, key: str) -> set[str]:
        """Files the manifest says this job wrote or was writing (it may replace them when redone)."""
        entry = self.entry(key) or {}
        return {f.get("name") for f in entry.get("files") or [] if isinstance(f, dict)}

    def status(self, key: str, identity: dict) -> tuple[str, str]:
        """``("done" | "redo" | "conflict", reason)`` under the resume rule of the module docstring.

        ``redo``: run the job again, replacing the files its entry names; ``conflict``: the entry was
        made with another prompt, seed or sweep value, so its files are another result (not replaced).
        """
        entry = self.entry(key)
        if entry is None:
            return "redo", "not run yet"
        changed = [k for k, v in identity.items() if entry.get(k) != v]
        if changed:
            return "conflict", f"its files were made with another {', '.join(changed)}"
        if entry.get("state") != "done":
            return "redo", "a previous run stopped before all its files were downloaded"
        for f in entry.get("files") or []:
            path = self.out / str(f.get("name"))
            if not path.is_file():
                return "redo", f"{path.name} is missing"
            if path.stat().st_size != f.get("bytes") or sha256_file(path) != f.get("sha256"):
                return "redo", f"{path.name} differs from the recorded size/SHA-256 (incomplete or changed)"
        return "done", ""
