"""Build a ComfyUI workflow once and emit both formats: UI (litegraph, for drag-and-drop) and API (for /prompt).

UI format rules followed (ComfyUI 0.8 frontend): ``widgets_values`` positional, one entry per widget plus
the ``control_after_generate`` value after each widget that has one; a node's ``inputs`` list its sockets
(in definition order) followed by the widgets that are driven by a link (``"widget": {"name": ...}``);
links ``[id, from_node, from_slot, to_node, to_slot, TYPE]``; ``properties`` with ``Node name for S&R``,
``cnr_id`` / ``ver`` and, on loaders, ``models`` (file name, URL, folder) for the missing-model dialog.
Frontend-only nodes (notes) appear only in the UI format.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workflow_specs import FRONTEND_ONLY, socket_inputs, widget_names

CORE_CNR = "comfy-core"
CORE_VER = "0.8.0"
PACK_CNR = "zimage-dimfix"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    title: str | None
    widgets: dict
    links_in: dict  # input name -> (Node, output slot)
    size: tuple[float, float] | None
    models: list | None
    control: dict
    color: str | None = None
    out_links: dict = field(default_factory=dict)  # slot -> [link ids]

    def __getitem__(self, slot: int) -> tuple["Node", int]:
        return self, slot


@dataclass
class Column:
    """A vertical stack of nodes at ``x``: each node added with this column as ``pos`` goes below the last."""

    x: float
    y: float = 0.0
    gap: float = 50.0  # between a node's bottom and the next node's title bar

    def place(self, height: float) -> tuple[float, float]:
        pos = (self.x, self.y)
        self.y += height + TITLE_HEIGHT + self.gap
        return pos


TITLE_HEIGHT = 30.0
SLOT_HEIGHT = 20.0
#: The window a first-time user opens the workflow in, and the frontend chrome around the canvas
#: (left: the sidebar's icon column; top: the menu and workflow tab bar).
VIEW_SIZE = (1280.0, 800.0)
VIEW_MARGINS = {"left": 80.0, "top": 100.0, "right": 80.0, "bottom": 60.0}
#: Screen rectangle of the frontend's minimap and canvas toolbar (bottom right, shown by default).
MINIMAP = (1015.0, 535.0, 1280.0, 800.0)
MAX_SCALE = 1.0
WIDGET_HEIGHT = 24.0
MULTILINE_HEIGHT = 110.0


class Graph:
    """Collect nodes and links; :meth:`ui` and :meth:`api` render the two formats."""

    def __init__(self, specs: dict, pack_types: set[str], pack_version: str, workflow_id: str | None = None):
        self.specs = specs
        self.pack_types = set(pack_types)
        self.pack_version = pack_version
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self.workflow_id = workflow_id or str(uuid.uuid4())

    # ------------------------------------------------------------------ construction
    def add(self, type_: str, pos: "tuple[float, float] | Column", title: str | None = None, widgets: dict | None = None,
            inputs: dict | None = None, size: tuple[float, float] | None = None, models: list | None = None,
            control: dict | None = None, color: str | None = None) -> Node:
        """Add a node. ``widgets``: every widget's value (also for link-driven widgets: the UI keeps it);
        ``inputs``: name → ``(node, output_slot)`` for sockets and link-driven widgets; ``control``:
        widget name → control_after_generate value (default "fixed"); ``pos`` a point or a :class:`Column`."""
        spec = self.specs.get(type_)
        if spec is None:
            raise KeyError(f"no spec for node type {type_!r}; add it to the specs table")
        widgets = dict(widgets or {})
        inputs = dict(inputs or {})
        names = widget_names(spec)
        missing = [n for n in names if n not in widgets]
        extra = [n for n in widgets if n not in names]
        if missing or extra:
            raise ValueError(f"{type_}: widget values missing {missing} / unknown {extra}; widgets: {names}")
        known = {i["name"] for i in spec["inputs"]}
        bad = [n for n in inputs if n not in known]
        if bad:
            raise ValueError(f"{type_}: unknown inputs {bad}; inputs: {sorted(known)}")
        for i in spec["inputs"]:
            if not i["widget"] and not i["optional"] and i["name"] not in inputs:
                raise ValueError(f"{type_}: required socket {i['name']!r} is not connected")
        node = Node(len(self.nodes) + 1, type_, (0.0, 0.0), title, widgets, inputs, size, models,
                    dict(control or {}), color)
        node.size = tuple(self._size(node))
        node.pos = pos.place(node.size[1]) if isinstance(pos, Column) else tuple(pos)
        self.nodes.append(node)
        return node

    def group(self, title: str, bounding: tuple[float, float, float, float], color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": color, "font_size": 24, "flags": {}})

    # ------------------------------------------------------------------ helpers
    def _spec(self, node: Node) -> dict:
        return self.specs[node.type]

    def _ui_inputs(self, node: Node) -> list[dict]:
        spec = self._spec(node)
        out = [{"name": i["name"], "type": i["type"]} for i in socket_inputs(spec)]
        for i in spec["inputs"]:
            if i["widget"] and i["name"] in node.links_in:
                out.append({"name": i["name"], "type": i["type"], "widget": {"name": i["name"]}})
        return out

    def _order(self) -> dict[int, int]:
        """Topological execution order (Kahn, stable by id) as the frontend stores it in ``order``."""
        deps = {n.id: {src.id for src, _ in n.links_in.values()} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(deps):
            ready = [i for i in sorted(deps) if i not in done and deps[i] <= set(done)]
            if not ready:
                raise ValueError("workflow graph has a cycle")
            done.append(ready[0])
        return {nid: k for k, nid in enumerate(done)}

    def _size(self, node: Node) -> list[float]:
        """The given size, else one that fits the node's slots and widgets as the frontend draws them."""
        if node.size:
            return list(node.size)
        spec = self._spec(node)
        rows = max(len(self._ui_inputs(node)), len(spec["outputs"]))
        h = 14 + SLOT_HEIGHT * rows
        for i in spec["inputs"]:
            if i["widget"]:
                h += MULTILINE_HEIGHT if i.get("multiline") else WIDGET_HEIGHT
                h += WIDGET_HEIGHT if i.get("control") else 0
        return [320.0, float(h)]

    # ------------------------------------------------------------------ rendering
    def ui(self) -> dict:
        self.links = []
        for n in self.nodes:
            n.out_links = {}
        link_id = 0
        in_links: dict[tuple[int, str], int] = {}
        for node in self.nodes:
            slots = {e["name"]: k for k, e in enumerate(self._ui_inputs(node))}
            for name, (src, slot) in node.links_in.items():
                link_id += 1
                out_type = self._spec(src)["outputs"][slot]["type"]
                self.links.append([link_id, src.id, slot, node.id, slots[name], out_type])
                src.out_links.setdefault(slot, []).append(link_id)
                in_links[(node.id, name)] = link_id
        order = self._order()
        nodes = []
        for node in self.nodes:
            spec = self._spec(node)
            inputs = self._ui_inputs(node)
            for e in inputs:
                e["link"] = in_links.get((node.id, e["name"]))
            outputs = [{"name": o["name"], "type": o["type"], "links": node.out_links.get(k, []), "slot_index": k}
                       for k, o in enumerate(spec["outputs"])]
            values = []
            for i in spec["inputs"]:
                if i["widget"]:
                    values.append(node.widgets[i["name"]])
                    if i.get("control"):
                        values.append(node.control.get(i["name"], "fixed"))
            if node.type in FRONTEND_ONLY:
                props: dict[str, Any] = {}
            elif node.type in self.pack_types:
                props = {"Node name for S&R": node.type, "cnr_id": PACK_CNR, "ver": self.pack_version}
            else:
                props = {"Node name for S&R": node.type, "cnr_id": CORE_CNR, "ver": CORE_VER}
            if node.models:
                props["models"] = node.models
            entry = {"id": node.id, "type": node.type, "pos": list(node.pos),
                     "size": list(node.size), "flags": {}, "order": order[node.id],
                     "mode": 0, "inputs": inputs, "outputs": outputs, "properties": props,
                     "widgets_values": values}
            if node.title:
                entry["title"] = node.title
            if node.color:
                entry["color"] = node.color
            nodes.append(entry)
        return {"id": self.workflow_id, "revision": 0, "last_node_id": max(n.id for n in self.nodes),
                "last_link_id": link_id, "nodes": nodes, "links": self.links, "groups": self.groups,
                "definitions": {"subgraphs": []}, "config": {},
                "extra": {"ds": fit_view(self.boxes())}, "version": 0.4}

    def boxes(self) -> list[tuple[float, float, float, float]]:
        """Canvas rectangles ``(x0, y0, x1, y1)`` of every node (title bar included) and every group."""
        boxes = [(n.pos[0], n.pos[1] - TITLE_HEIGHT, n.pos[0] + n.size[0], n.pos[1] + n.size[1]) for n in self.nodes]
        return boxes + [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in self.groups)]

    def api(self) -> dict:
        out = {}
        for node in self.nodes:
            if node.type in FRONTEND_ONLY:
                continue
            spec = self._spec(node)
            inputs: dict[str, Any] = {}
            for i in spec["inputs"]:
                name = i["name"]
                if name in node.links_in:
                    src, slot = node.links_in[name]
                    inputs[name] = [str(src.id), slot]
                elif i["widget"]:
                    inputs[name] = node.widgets[name]
            out[str(node.id)] = {"inputs": inputs, "class_type": node.type,
                                 "_meta": {"title": node.title or node.type}}
        return out


def to_screen(box: tuple[float, float, float, float], ds: dict) -> tuple[float, float, float, float]:
    """LiteGraph draws canvas point ``p`` at screen ``(p + offset) * scale``."""
    (ox, oy), k = ds["offset"], ds["scale"]
    return (box[0] + ox) * k, (box[1] + oy) * k, (box[2] + ox) * k, (box[3] + oy) * k


def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def fit_view(boxes: list, view=VIEW_SIZE, margins=VIEW_MARGINS, minimap=MINIMAP) -> dict:
    """``extra.ds`` that shows every box inside ``view`` less ``margins``, top-left aligned, none under the
    minimap (the scale shrinks until the bottom-right corner is free)."""
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    free_w = view[0] - margins["left"] - margins["right"]
    free_h = view[1] - margins["top"] - margins["bottom"]
    scale = min(MAX_SCALE, free_w / (x1 - x0), free_h / (y1 - y0))
    while True:
        scale = float(int(scale * 1000) / 1000)  # round down: never a pixel over the edge
        ds = {"scale": scale, "offset": [round(margins["left"] / scale - x0, 1), round(margins["top"] / scale - y0, 1)]}
        if not any(overlaps(to_screen(b, ds), minimap) for b in boxes):
            return ds
        scale *= 0.99


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Pretty JSON (2-space indent, UTF-8, trailing newline), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
