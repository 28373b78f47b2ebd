"""Bundled API workflows validated by ComfyUI's own ``execution.validate_prompt``; node specs vs live ComfyUI."""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import pytest

from zdf_testkit import tiny_zimage as tz
from zdf_testkit.build_workflows import USED_TYPES
from zdf_testkit.live_comfy import (comfyui_version, current_specs, ensure_extra_nodes, host_version,
                                   pack_nodes_registered)
from zdf_testkit.workflow_specs import FRONTEND_ONLY, SPEC_FILE, load_specs

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "workflows" / "api"
STEMS = sorted(p.stem for p in API.glob("*.json"))


def tiny_names(graph: dict, names: dict) -> dict:
    """The graph with every model file replaced by the tiny test models (same structure otherwise)."""
    g = json.loads(json.dumps(graph))
    for node in g.values():
        i, cls = node["inputs"], node["class_type"]
        if cls == "UNETLoader":
            i["unet_name"] = names["dit"]
        elif cls == "CLIPLoader":
            i["clip_name"] = names["te"]
        elif cls == "VAELoader":
            i["vae_name"] = names["vae"]
        elif cls == "DimFixQwen3EmbeddingLoader":
            i["model_name"] = names["substitute"]
            i["analysis_only"] = True  # the tiny test encoders are 64 wide
    return g


@pytest.fixture(scope="module")
def registered(comfy, pack):
    ensure_extra_nodes(comfy.nodes)
    models = tz.write_tiny_models(comfy.models)
    comfy.folder_paths.filename_list_cache.clear()
    with pack_nodes_registered(comfy.nodes, pack.node_list):
        yield models


def validate(graph: dict):
    execution = importlib.import_module("execution")
    return asyncio.run(execution.validate_prompt("test", graph, None))


def test_checked_in_specs_match_live_comfyui(comfy, pack):
    """The table is recorded on the oldest supported host (0.8.0) and must equal it there. A newer host may
    append outputs to a node (SaveImage gained IMAGE in 0.26, PreviewAny STRING in 0.19.1): links by slot
    index stay valid, so there the recorded outputs must be a prefix of the live ones and inputs identical."""
    live = json.loads(json.dumps(current_specs(comfy.nodes, pack.node_list, USED_TYPES)))  # enum types -> str
    live = {k: v for k, v in live.items() if k not in FRONTEND_ONLY}
    table = {k: v for k, v in load_specs().items() if k not in FRONTEND_ONLY}
    recorded_on = json.loads(SPEC_FILE.read_text(encoding="utf-8"))["comfyui_version"]
    hint = "node specs changed: run `cd tests && COMFYUI_PATH=... python -m zdf_testkit.build_workflows --refresh-specs`"
    if comfyui_version() == recorded_on:
        assert live == table, hint
        return
    assert sorted(live) == sorted(table), hint
    for name, spec in table.items():
        got = live[name]
        assert got["inputs"] == spec["inputs"] and got["output_node"] == spec["output_node"], (name, hint)
        assert got["outputs"][:len(spec["outputs"])] == spec["outputs"], (name, "outputs were removed or reordered")
    grown = {k for k in table if len(live[k]["outputs"]) > len(table[k]["outputs"])}
    if host_version() >= (0, 26):
        assert grown >= {"SaveImage", "PreviewAny"}


@pytest.mark.parametrize("stem", STEMS)
def test_api_workflow_validates_in_comfyui(registered, stem):
    graph = json.loads((API / f"{stem}.json").read_text(encoding="utf-8"))
    valid, error, outputs, node_errors = validate(tiny_names(graph, registered.names))
    assert node_errors == {} and valid, (error, node_errors)
    expected_outputs = sorted(k for k, v in graph.items() if v["class_type"] in
                              ("SaveImage", "PreviewAny", "DimFixComparisonGrid", "DimFixDimensionAnalyzer"))
    assert sorted(outputs) == expected_outputs


def test_missing_models_are_reported_by_name(registered):
    """Negative control: the shipped names are not in the test folders, so validation names each file."""
    graph = json.loads((API / "zimage_dimfix_fix_comparison_grid.json").read_text(encoding="utf-8"))
    valid, _, _, node_errors = validate(graph)
    assert not valid
    text = json.dumps(node_errors)
    for name in ("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors", "Qwen3-Embedding-4B"):
        assert name in text
    # the substitute (an HF folder no frontend lists as a missing model): the error says what to get and where
    assert "is not in models/text_encoders" in text and "huggingface-cli download Qwen/Qwen3-Embedding-4B" in text


def test_wrong_link_type_is_rejected(registered):
    graph = tiny_names(json.loads((API / "zimage_dimfix_blend.json").read_text(encoding="utf-8")), registered.names)
    blend = next(k for k, v in graph.items() if v["class_type"] == "DimFixEmbeddingBlend")
    clip = next(k for k, v in graph.items() if v["class_type"] == "CLIPLoader")
    graph[blend]["inputs"]["secondary"] = [clip, 0]
    valid, _, _, node_errors = validate(graph)
    assert not valid and "return_type_mismatch" in json.dumps(node_errors)
