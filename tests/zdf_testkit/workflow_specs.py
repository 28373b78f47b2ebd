"""Socket/widget specs of the node types used by the bundled workflows (checked-in table + live extraction).

A spec says, per node type, which inputs are sockets and which are widgets (and which widgets carry the
extra ``control_after_generate`` entry in a UI workflow's ``widgets_values``; ``multiline`` marks tall
text boxes), plus the output types:

    {"KSampler": {"inputs": [{"name": "model", "type": "MODEL", "widget": false, "optional": false},
                             {"name": "seed", "type": "INT", "widget": true, "control": true, ...}, ...],
                  "outputs": [{"name": "LATENT", "type": "LATENT"}], "output_node": false}, ...}

The table ``workflow_node_specs.json`` lets the core tier check workflows without ComfyUI; the host tier
re-extracts every spec from the live ComfyUI and the pack (:func:`live_specs`) and compares.
Frontend-only types (notes) have fixed specs in :data:`FRONTEND_ONLY`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

SPEC_FILE = Path(__file__).resolve().parent / "workflow_node_specs.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

#: Node types that exist only in the frontend (never in API-format workflows).
FRONTEND_ONLY: dict[str, dict] = {
    "MarkdownNote": {"inputs": [{"name": "text", "type": "STRING", "widget": True, "optional": False,
                                 "multiline": True}], "outputs": [], "output_node": False},
    "Note": {"inputs": [{"name": "text", "type": "STRING", "widget": True, "optional": False, "multiline": True}],
             "outputs": [], "output_node": False},
}


def _is_widget(type_: Any, opts: dict) -> bool:
    if isinstance(type_, list):
        return True  # V1 combo: the option list itself
    return type_ in WIDGET_TYPES and not opts.get("forceInput")


def spec_from_info(info: dict) -> dict:
    """Spec of one node from its ``/object_info`` entry (V1 node-info dict)."""
    inputs = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        entries = (info.get("input") or {}).get(section) or {}
        names = order.get(section) or list(entries)
        for name in names:
            value = entries[name]
            type_ = value[0]
            opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            widget = _is_widget(type_, opts)
            item = {"name": name, "type": "COMBO" if isinstance(type_, list) else type_, "widget": widget,
                    "optional": section == "optional"}
            if widget and opts.get("control_after_generate"):
                item["control"] = True
            if widget and opts.get("multiline"):
                item["multiline"] = True
            inputs.append(item)
    names = info.get("output_name") or info.get("output") or []
    outputs = [{"name": n, "type": t} for n, t in zip(names, info.get("output") or [])]
    return {"inputs": inputs, "outputs": outputs, "output_node": bool(info.get("output_node"))}


def node_info(cls: Any) -> dict:
    """The ``/object_info`` entry of a node class (V3 via its V1 view; V1 from its class attributes)."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    info = {"input": types, "input_order": {k: list(v) for k, v in types.items() if k != "hidden"},
            "output": list(cls.RETURN_TYPES), "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    info["output_name"] = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    return info


def live_specs(class_mappings: dict, class_types: Iterable[str]) -> dict:
    """Specs extracted from live node classes (``nodes.NODE_CLASS_MAPPINGS`` plus the pack's nodes)."""
    out = {}
    for name in sorted(set(class_types)):
        if name in FRONTEND_ONLY:
            out[name] = FRONTEND_ONLY[name]
        else:
            out[name] = spec_from_info(node_info(class_mappings[name]))
    return out


def load_specs(path: str | os.PathLike = SPEC_FILE) -> dict:
    """The checked-in specs (plus the frontend-only ones)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {**FRONTEND_ONLY, **data["nodes"]}


def write_specs(specs: dict, path: str | os.PathLike = SPEC_FILE, comfyui_version: str = "") -> None:
    """Write the table (frontend-only types excluded), sorted, atomically."""
    path = Path(path)
    data = {"comfyui_version": comfyui_version,
            "nodes": {k: specs[k] for k in sorted(specs) if k not in FRONTEND_ONLY}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def widget_names(spec: dict) -> list[str]:
    """Widget input names in ``widgets_values`` order (without the control entries)."""
    return [i["name"] for i in spec["inputs"] if i["widget"]]


def widget_count(spec: dict) -> int:
    """Length of a UI node's ``widgets_values``: one per widget plus one per ``control_after_generate``."""
    return sum(1 + int(bool(i.get("control"))) for i in spec["inputs"] if i["widget"])


def socket_inputs(spec: dict) -> list[dict]:
    return [i for i in spec["inputs"] if not i["widget"]]
