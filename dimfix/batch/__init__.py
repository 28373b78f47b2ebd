"""Run an API-format ComfyUI workflow over many prompts on one or more servers through the HTTP API.

Standard library only: ``python -m dimfix.batch`` works from the pack folder with any Python ≥ 3.10.

    python -m dimfix.batch --server http://127.0.0.1:8188 [--server http://127.0.0.1:8189 ...] \\
        --workflow workflows/api/X.json --prompt-node Prompt --seed-node KSampler --seed 42 --out out/run1 \\
        [--prompts FILE] [--limit N] [--sweep NODE.INPUT=a,b] [--fetch output|all] [--fetch-node NODE]

A job is one prompt × one combination of the ``--sweep`` values (a cross product). For each job the
text input of every node matching ``--prompt-node`` (a node id, a ``_meta.title`` or a ``class_type``)
and the swept inputs are set, the graph is queued (``POST /prompt``) on the server with the shortest
queue, its end is taken from the websocket (``/ws?clientId=``; ``GET /history/{id}`` polling when the
socket is refused), and the selected images are downloaded (``GET /view``) to
``OUT/<index>_<slug>[_s<k>-<values>]_<node>_<n>.<ext>``. ``OUT/results.jsonl`` gets one JSON line per
job (status, server, prompt id, seed, sweep values, files, timings), ``OUT/manifest.json`` the files of
every finished job with size and SHA-256, and ``OUT/index.html`` a contact sheet.

Fetch: by default only images of type ``output`` (written by Save nodes) are downloaded; temporary
previews (Preview Image, the analyzer's plots, the grid's preview) are skipped. ``fetch="all"`` takes
every image, ``fetch_nodes`` exactly the images of the named nodes; ``save_nodes`` adds a SaveImage on
output 0 of the named nodes (e.g. every ``VAEDecode``: one image per fix mode) and fetches it too.

Seeds: with ``--seed N`` the seed input of the ``--seed-node`` nodes is ``N + prompt index``
(``--seed-mode increment``; every sweep combination of one prompt shares its seed) or ``N`` for all
(``--seed-mode fixed``); with ``--seed-node`` but no ``--seed`` a random base seed is drawn and recorded
in the manifest, and a resumed run reuses it. Without ``--seed-node`` the workflow's own seed is kept.

Resume: a job counts as done only when the manifest lists it as finished with the same prompt, seed and
sweep values and every one of its files is present with the recorded size and SHA-256; anything else is
run again (its own leftovers replaced), finished files are never rewritten, and a file the manifest
does not know is never replaced unless ``overwrite=True``. Images are written atomically.

Servers: a server that fails for ``down_after`` seconds is dropped and its unfinished prompts go to the
others. Ctrl-C removes our prompts from every queue, interrupts them and stops.

Exit codes of :func:`main`: 0 all jobs done (or skipped), 1 some jobs failed, 2 bad arguments,
workflow, corpus or a graph the server rejected, 3 no server reachable, 130 interrupted.
"""

from .client import (ComfyClient, ComfyConnectionError, ComfyError, ComfyExecutionError, ComfyPromptError,
                     ComfyTimeout)
from .cli import main
from .graph import (WorkflowError, add_save_nodes, find_nodes, load_api_workflow, parse_sweep, set_input,
                    validate_api_workflow)
from .jobs import run_batch
from .records import BatchResult, extract_verdict, select_images
from .sheet import write_contact_sheet
from .store import MANIFEST_FILE, RESULTS_FILE, Manifest, slugify
from .ws import EventMonitor, WebSocket

__all__ = [
    "ComfyError", "ComfyConnectionError", "ComfyPromptError", "ComfyExecutionError", "ComfyTimeout",
    "WorkflowError", "ComfyClient", "BatchResult", "load_api_workflow", "validate_api_workflow",
    "find_nodes", "set_input", "parse_sweep", "add_save_nodes", "slugify", "run_batch", "main", "select_images",
    "extract_verdict", "write_contact_sheet", "Manifest", "EventMonitor", "WebSocket", "RESULTS_FILE",
    "MANIFEST_FILE",
]
