"""``python -m dimfix.batch``: the command line of the batch runner (exit codes in the package docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..corpus import default_corpus_path, load_corpus
from .client import ComfyClient, ComfyConnectionError, ComfyError, ComfyPromptError
from .display import LiveLine
from .graph import WorkflowError, load_api_workflow, parse_sweep, sweep_combinations
from .jobs import run_batch
from .store import RESULTS_FILE

__all__ = ["main"]

DEFAULT_SERVER = "http://127.0.0.1:8188"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dimfix.batch",
        description="Run an API-format ComfyUI workflow once per prompt (× sweep values) on one or more "
                    "ComfyUI servers and download the images.")
    p.add_argument("--server", action="append", default=None,
                   help=f"ComfyUI URL; repeat for several servers (default {DEFAULT_SERVER})")
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (ComfyUI: File → Export (API))")
    p.add_argument("--prompts", default=None,
                   help="prompt file, one per line, '#' comments (default: the pack's calibration corpus)")
    p.add_argument("--prompt-node", required=True,
                   help="node id, _meta.title or class_type of the text node(s); every match is set")
    p.add_argument("--prompt-input", default="text", help="input name of the prompt text (default %(default)s)")
    p.add_argument("--seed-node", default=None, help="node id, title or class_type holding the seed")
    p.add_argument("--seed-input", default="seed", help="input name of the seed (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: random, recorded, reused on resume)")
    p.add_argument("--seed-mode", choices=("increment", "fixed"), default="increment",
                   help="seed per prompt: base + index (default) or the same seed for all")
    p.add_argument("--sweep", action="append", default=[], metavar="NODE.INPUT=a,b",
                   help="run every value of a node input (INPUT=a,b: every node with that input); repeat for "
                        "a cross product with the prompts")
    p.add_argument("--fetch", choices=("output", "all"), default="output",
                   help="images to download: 'output' (Save nodes, default) or 'all' (also temp previews)")
    p.add_argument("--fetch-node", action="append", default=[], metavar="NODE",
                   help="download exactly the images of these nodes (id, title or class_type); repeatable")
    p.add_argument("--save-node", action="append", default=[], metavar="NODE",
                   help="add a SaveImage on output 0 of these nodes and fetch it (e.g. VAEDecode: one image per "
                        "fix mode of the grid workflow); repeatable")
    p.add_argument("--verdict", default=None, metavar="FILE",
                   help="analyzer report (markdown) whose verdict heads the contact sheet")
    p.add_argument("--out", required=True, help="output folder (images, results.jsonl, manifest.json, index.html)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--overwrite", action="store_true", help="redo every job and replace existing files")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for one prompt once its server turns to it (default %(default)s)")
    p.add_argument("--poll", type=float, default=0.5, help="history polling interval in s (default %(default)s)")
    p.add_argument("--no-websocket", action="store_true", help="poll /history only (no /ws progress events)")
    p.add_argument("--depth", type=int, default=2,
                   help="prompts kept queued per server (default %(default)s: the next one waits while one runs)")
    p.add_argument("--down-after", type=float, default=20.0,
                   help="seconds a server may fail before its prompts move to the others (default %(default)s)")
    p.add_argument("--stop-on-error", action="store_true", help="queue nothing new after the first failed job")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check(args) -> str | None:
    if args.limit is not None and args.limit < 1:
        return f"--limit must be >= 1, got {args.limit}"
    if args.seed_node is None and args.seed is not None:
        return "--seed needs --seed-node (the node whose seed input is set)"
    if args.depth < 1 or args.down_after < 0 or args.poll < 0:
        return "--depth must be >= 1, --down-after and --poll >= 0"
    if args.fetch_node and args.fetch != "output":
        return "--fetch-node names the nodes to download; do not combine it with --fetch all"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see the package docstring)."""
    args = _parser().parse_args(argv)

    def err(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr)

    display = LiveLine(0, quiet=args.quiet)  # log lines clear the live line first
    log = None if args.quiet else display.log
    problem = _check(args)
    if problem:
        err(problem)
        return 2
    try:
        graph = load_api_workflow(args.workflow)
        corpus = load_corpus(args.prompts if args.prompts else default_corpus_path())
        for note in corpus.notes if log else ():
            log(note)
        prompts = corpus.prompts[: args.limit] if args.limit else corpus.prompts
        sweeps = [parse_sweep(graph, spec) for spec in args.sweep]
        verdict = Path(args.verdict).read_text(encoding="utf-8") if args.verdict else None
        servers = args.server or [DEFAULT_SERVER]
        clients = [ComfyClient(url, timeout=max(30.0, args.poll * 4)) for url in servers]
        display.total = len(prompts) * len(sweep_combinations(sweeps))
        results = run_batch(clients, graph, prompts, args.prompt_node, args.prompt_input, args.seed_node,
                            args.seed, args.out, args.overwrite, seed_input=args.seed_input,
                            seed_mode=args.seed_mode, timeout=args.timeout, poll_interval=args.poll,
                            stop_on_error=args.stop_on_error, log=log, fetch=args.fetch,
                            fetch_nodes=args.fetch_node, save_nodes=args.save_node, sweeps=sweeps,
                            verdict_text=verdict,
                            websocket=not args.no_websocket, depth=args.depth, down_after=args.down_after,
                            display=display)
    except KeyboardInterrupt:
        err("interrupted; our prompts were removed from the server queues and interrupted")
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
        log(f"{len(results) - len(failed)}/{len(results)} jobs done, results in {Path(args.out) / RESULTS_FILE}, "
            f"contact sheet {Path(args.out) / 'index.html'}")
    return 1 if failed else 0
