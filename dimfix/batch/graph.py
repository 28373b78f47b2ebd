"""API-format workflow graphs: loading, node selection, input overrides and ``--sweep`` specs."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["WorkflowError", "load_api_workflow", "validate_api_workflow", "find_nodes", "set_input",
           "Sweep", "parse_sweep", "sweep_combinations", "apply_sweeps", "node_label", "node_title",
           "add_save_nodes"]


class WorkflowError(ValueError):
    """The workflow file, a node selector or a sweep spec is not usable."""


def validate_api_workflow(data: Any, source: str = "workflow") -> dict:
    """Return the API-format graph in ``data`` or raise :class:`WorkflowError` (UI format, not a graph)."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]  # a saved ``POST /prompt`` body
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{source}: expected an API-format workflow (a JSON object of nodes), "
                            f"got {type(data).__name__}{' (empty)' if not data else ''}")
    if "nodes" in data and ("links" in data or isinstance(data["nodes"], list)):
        raise WorkflowError(f"{source}: this is a UI workflow; export with 'Save (API)' "
                            "(ComfyUI main menu: File → Export (API)) and pass that file")
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


def node_title(graph: dict, node_id: str) -> str:
    """A node's ``_meta.title``, else its class_type, else ``"node <id>"``."""
    node = graph.get(str(node_id)) or {}
    return (node.get("_meta") or {}).get("title") or node.get("class_type") or f"node {node_id}"


def node_label(graph: dict, node_id: str) -> str:
    """``"<id>: <class_type> '<title>'"`` of one node (title only when the graph has one)."""
    node = graph.get(str(node_id)) or {}
    title = (node.get("_meta") or {}).get("title")
    return f"{node_id}: {node.get('class_type', '?')}" + (f" '{title}'" if title else "")


def _describe(graph: dict) -> str:
    return ", ".join(node_label(graph, nid) for nid in graph)


def find_nodes(graph: dict, selector: str | int) -> list[str]:
    """Node ids matching ``selector``: an exact node id, else ``_meta.title`` matches, else class_type matches."""
    sel = str(selector)
    if sel in graph:
        return [sel]
    by_title = [nid for nid, n in graph.items() if (n.get("_meta") or {}).get("title") == sel]
    if by_title:
        return by_title
    return [nid for nid, n in graph.items() if n.get("class_type") == sel]


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


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
        if _is_link(inputs[name]):
            raise WorkflowError(f"input {name!r} of node {nid} ({new[nid].get('class_type')}) is connected to "
                                f"node {inputs[name][0]}; select that node instead")
        inputs[name] = copy.deepcopy(value)
    return new


@dataclass(frozen=True)
class Sweep:
    """One ``--sweep``: ``values`` for input ``name`` of the nodes ``node_ids`` (``label`` as typed)."""

    label: str
    node_ids: tuple[str, ...]
    name: str
    values: tuple[Any, ...]


def _coerce(text: str, current: Any, spec: str) -> Any:
    """A sweep value typed like the input's current value (bool, int, float, else the text)."""
    if isinstance(current, bool):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
    elif isinstance(current, (int, float)):
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            return int(number) if isinstance(current, int) and number.is_integer() else number
    else:
        return text
    raise WorkflowError(f"--sweep {spec!r}: {text!r} is not a {type(current).__name__} "
                        f"(the input's current value is {current!r})")


def parse_sweep(graph: dict, spec: str) -> Sweep:
    """Parse ``NODE.INPUT=a,b,c`` (NODE by id, title or class_type; every match is set) or ``INPUT=a,b``
    (every node with a literal input of that name). Values are split on commas and typed like the input."""
    target, sep, raw = spec.partition("=")
    values_text = [v.strip() for v in raw.split(",")]
    if not sep or not target.strip() or not raw.strip() or any(v == "" for v in values_text):
        raise WorkflowError(f"--sweep {spec!r}: expected NODE.INPUT=a,b,c or INPUT=a,b,c "
                            "(comma-separated values, none empty)")
    node_sel, dot, name = target.strip().rpartition(".")
    if dot:
        ids = find_nodes(graph, node_sel)
        if not ids:
            raise WorkflowError(f"--sweep {spec!r}: no node matches {node_sel!r}; nodes: {_describe(graph)}")
    else:
        ids = [nid for nid, n in graph.items() if name in (n.get("inputs") or {})
               and not _is_link(n["inputs"][name])]
        if not ids:
            raise WorkflowError(f"--sweep {spec!r}: no node has a literal input {name!r}; "
                                "use NODE.INPUT to name the node")
    for nid in ids:  # validates input names and links, lists candidates on error
        set_input(graph, nid, name, None)
    current = graph[ids[0]]["inputs"][name]
    values = tuple(_coerce(v, current, spec) for v in values_text)
    if len(set(map(repr, values))) != len(values):
        raise WorkflowError(f"--sweep {spec!r}: a value is repeated")
    return Sweep(target.strip(), tuple(ids), name, values)


def sweep_combinations(sweeps: Sequence[Sweep]) -> list[tuple[Any, ...]]:
    """The cross product of the sweeps' values (one empty combination when there is no sweep)."""
    return list(itertools.product(*(s.values for s in sweeps)))


def apply_sweeps(graph: dict, sweeps: Sequence[Sweep], combo: Sequence[Any]) -> dict:
    """A new graph with one combination of sweep values set."""
    for sweep, value in zip(sweeps, combo):
        for nid in sweep.node_ids:
            graph = set_input(graph, nid, sweep.name, value)
    return graph


def _upstream_title(graph: dict, node_id: str) -> str:
    """The node's title; for an untitled node (title = class_type) the title of its first linked input."""
    title = node_title(graph, node_id)
    node = graph.get(str(node_id)) or {}
    if title == node.get("class_type"):
        for value in (node.get("inputs") or {}).values():
            if _is_link(value) and str(value[0]) in graph:
                return f"{node_title(graph, str(value[0]))} → {title}"
    return title


def add_save_nodes(graph: dict, selectors: Sequence[str]) -> tuple[dict, list[str]]:
    """A NEW graph with a ``SaveImage`` on output 0 of every node matching ``selectors`` (e.g. the
    ``VAEDecode`` of each fix mode), and the ids of the added nodes; their titles name the source."""
    new = copy.deepcopy(graph)
    added = []
    for sel in selectors:
        ids = find_nodes(graph, sel)
        if not ids:
            raise WorkflowError(f"save node {sel!r}: no node matches (by id, _meta.title or class_type); "
                                f"nodes: {_describe(graph)}")
        for nid in ids:
            save_id = f"dimfix_save_{nid}"
            if save_id in new:
                continue
            new[save_id] = {"class_type": "SaveImage",
                            "inputs": {"images": [nid, 0], "filename_prefix": f"dimfix_batch/node_{nid}"},
                            "_meta": {"title": f"Save · {_upstream_title(graph, nid)}"}}
            added.append(save_id)
    return new, added
