"""Bundled workflows: both formats parse, pair up, and agree with each other and with the node specs.

No ComfyUI needed: node layouts come from the checked-in specs table
(``tests/zdf_testkit/workflow_node_specs.json``, verified against a live ComfyUI in the host tier).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from zdf_testkit.build_workflows import UI_NAMES
from zdf_testkit.workflow_specs import FRONTEND_ONLY, load_specs, socket_inputs, widget_count, widget_names

ROOT = Path(__file__).resolve().parents[2]
WF = ROOT / "workflows"
API = WF / "api"
SPECS = load_specs()
PACK_CNR = "zimage-dimfix"
#: API twins' stems (workflows/api/<stem>.json); the UI file is workflows/<UI_NAMES[stem]>.json.
EXPECTED_STEMS = ["zimage_dimfix_analyze", "zimage_dimfix_base_negative", "zimage_dimfix_blend",
                  "zimage_dimfix_fix_comparison_grid", "zimage_dimfix_layer_select"]
LOADER_FOLDERS = {"UNETLoader": ("unet_name", "diffusion_models"), "CLIPLoader": ("clip_name", "text_encoders"),
                  "VAELoader": ("vae_name", "vae")}
#: widgets_values length per node type, written out by hand (+1 after each control_after_generate widget).
EXPECTED_WIDGET_COUNTS = {
    "UNETLoader": 2, "ModelSamplingAuraFlow": 1, "CLIPLoader": 3, "VAELoader": 1, "CLIPTextEncode": 1,
    "ConditioningZeroOut": 0, "EmptySD3LatentImage": 3, "KSampler": 7, "VAEDecode": 0, "SaveImage": 1,
    "PreviewAny": 0, "PrimitiveInt": 2, "PrimitiveStringMultiline": 1, "MarkdownNote": 1, "Note": 1,
    "DimFixQwen3EmbeddingLoader": 4, "DimFixHiddenLayerSelect": 1, "DimFixDimensionAnalyzer": 10,
    "DimFixEmbeddingDimensionFix": 7, "DimFixEmbeddingBlend": 5, "DimFixComparisonGrid": 5,
}


def pack_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)


def load(stem: str) -> tuple[dict, dict]:
    return (json.loads((WF / f"{UI_NAMES[stem]}.json").read_text(encoding="utf-8")),
            json.loads((API / f"{stem}.json").read_text(encoding="utf-8")))


def is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def types_match(out_type: str, in_type: str) -> bool:
    return in_type == "*" or out_type == in_type


# ------------------------------------------------------------------------------------------- files
def test_expected_workflows_and_api_twins_exist():
    assert sorted(UI_NAMES) == EXPECTED_STEMS
    assert sorted(p.stem for p in WF.glob("*.json")) == sorted(UI_NAMES.values())
    assert sorted(p.stem for p in API.glob("*.json")) == EXPECTED_STEMS


@pytest.mark.parametrize("name", sorted(UI_NAMES.values()))
def test_template_card_title_is_readable(name):
    """The template browser shows the file name as title and, with '-'/'_' as spaces, as description."""
    assert name[0].isupper() and "_" not in name and len(name) <= 40
    assert re.fullmatch(r"[A-Za-z0-9 ().,+-]+", name), "keep template names URL- and filesystem-friendly"


def test_widget_count_table_matches_specs():
    assert set(EXPECTED_WIDGET_COUNTS) == set(SPECS)
    for name, spec in SPECS.items():
        assert widget_count(spec) == EXPECTED_WIDGET_COUNTS[name], name


@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_files_equal_the_generator_output(stem):
    """The JSON files are generated (tests/zdf_testkit/build_workflows.py); hand edits would drift."""
    from zdf_testkit.build_workflows import WORKFLOW_BUILDERS

    g = WORKFLOW_BUILDERS[stem](SPECS)
    assert load(stem) == (g.ui(), g.api())


# ------------------------------------------------------------------------------------------- UI format
@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_ui_structure_and_links(stem):
    ui, _ = load(stem)
    for key in ("id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "definitions",
                "config", "extra", "version"):
        assert key in ui, key
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    links = {ln[0]: ln for ln in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] >= max(links)
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert type_ == out["type"] and types_match(type_, inp["type"]), (stem, link_id)
    # every reference to a link from a node is a real link, pointing back at that node
    for n in ui["nodes"]:
        for k, inp in enumerate(n["inputs"]):
            if inp["link"] is not None:
                assert links[inp["link"]][3:5] == [n["id"], k]
        for k, out in enumerate(n["outputs"]):
            assert out.get("slot_index", k) == k
            for lid in out["links"] or []:
                assert links[lid][1:3] == [n["id"], k]
    orders = sorted(n["order"] for n in ui["nodes"])
    assert orders == list(range(len(nodes)))
    for link_id, src, _, dst, _, _ in ui["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"]


@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_ui_nodes_match_specs(stem):
    ui, _ = load(stem)
    version = pack_version()
    for n in ui["nodes"]:
        spec = SPECS[n["type"]]
        assert len(n["widgets_values"]) == EXPECTED_WIDGET_COUNTS[n["type"]], (stem, n["id"], n["type"])
        sockets = [i["name"] for i in socket_inputs(spec)]
        names = [i["name"] for i in n["inputs"]]
        assert names[:len(sockets)] == sockets, (stem, n["id"])
        for inp in n["inputs"][len(sockets):]:  # widgets driven by a link
            assert inp["widget"]["name"] == inp["name"] and inp["name"] in widget_names(spec)
            assert inp["link"] is not None
        spec_types = {i["name"]: i["type"] for i in spec["inputs"]}
        assert all(inp["type"] == spec_types[inp["name"]] for inp in n["inputs"])
        assert [(o["name"], o["type"]) for o in n["outputs"]] == [(o["name"], o["type"]) for o in spec["outputs"]]
        for i in spec["inputs"]:  # required sockets are connected
            if not i["widget"] and not i["optional"]:
                assert n["inputs"][names.index(i["name"])]["link"] is not None, (stem, n["id"], i["name"])
        props = n["properties"]
        if n["type"] in FRONTEND_ONLY:
            continue
        assert props["Node name for S&R"] == n["type"]
        if n["type"].startswith("DimFix"):
            assert props["cnr_id"] == PACK_CNR and props["ver"] == version
        else:
            assert props["cnr_id"] == "comfy-core" and props["ver"]
        if n["type"] in LOADER_FOLDERS:
            widget, folder = LOADER_FOLDERS[n["type"]]
            (model,) = props["models"]
            assert model["name"] == n["widgets_values"][widget_names(spec).index(widget)]
            assert model["directory"] == folder and model["url"].startswith("https://huggingface.co/")
            assert model["url"].endswith("/" + model["name"])


@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_ui_seed_widgets_have_control_values(stem):
    ui, _ = load(stem)
    for n in ui["nodes"]:
        values = iter(n["widgets_values"])
        for i in SPECS[n["type"]]["inputs"]:
            if i["widget"]:
                next(values)
                if i.get("control"):
                    assert next(values) in ("fixed", "increment", "decrement", "randomize")


# ------------------------------------------------------------------------------------------- API format
@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_api_graph_references_and_types(stem):
    _, api = load(stem)
    assert api and all(set(v) >= {"class_type", "inputs"} for v in api.values())
    assert any(SPECS[v["class_type"]]["output_node"] for v in api.values())
    for nid, node in api.items():
        assert node["class_type"] not in FRONTEND_ONLY
        spec = SPECS[node["class_type"]]
        by_name = {i["name"]: i for i in spec["inputs"]}
        assert set(node["inputs"]) <= set(by_name), (stem, nid)
        for name, i in by_name.items():
            if i["widget"] or not i["optional"]:
                assert name in node["inputs"], (stem, nid, name)
        for name, value in node["inputs"].items():
            if is_link(value):
                src = api[value[0]]
                outputs = SPECS[src["class_type"]]["outputs"]
                assert 0 <= value[1] < len(outputs)
                assert types_match(outputs[value[1]]["type"], by_name[name]["type"]), (stem, nid, name)
            else:
                assert by_name[name]["widget"], (stem, nid, name)


@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_ui_and_api_agree(stem):
    ui, api = load(stem)
    nodes = {n["id"]: n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert sorted(api, key=int) == [str(i) for i in sorted(nodes)]
    links = {ln[0]: ln for ln in ui["links"]}
    for nid, n in nodes.items():
        a = api[str(nid)]
        assert a["class_type"] == n["type"]
        assert a["_meta"]["title"] == n.get("title", n["type"])
        linked = {inp["name"]: links[inp["link"]] for inp in n["inputs"] if inp["link"] is not None}
        for name, ln in linked.items():
            assert a["inputs"][name] == [str(ln[1]), ln[2]], (stem, nid, name)
        values = iter(n["widgets_values"])
        for i in SPECS[n["type"]]["inputs"]:
            if not i["widget"]:
                continue
            value = next(values)
            if i.get("control"):
                next(values)
            if i["name"] not in linked:
                assert a["inputs"][i["name"]] == value, (stem, nid, i["name"])
        unlinked_sockets = [i["name"] for i in socket_inputs(SPECS[n["type"]]) if i["name"] not in linked]
        assert not set(unlinked_sockets) & set(a["inputs"])


# ------------------------------------------------------------------------------------------- content
def test_fix_grid_workflow_compares_every_seed_mode_with_one_seed():
    ui, api = load("zimage_dimfix_fix_comparison_grid")
    by_class: dict[str, list[str]] = {}
    for nid, node in api.items():
        by_class.setdefault(node["class_type"], []).append(nid)
    modes = [api[f]["inputs"]["mode"] for f in by_class["DimFixEmbeddingDimensionFix"]]
    assert modes == ["none", "rescale", "mask", "clamp", "full", "affine", "adapter"]
    assert all(api[f]["inputs"]["fix_table"][0] == by_class["DimFixDimensionAnalyzer"][0]
               for f in by_class["DimFixEmbeddingDimensionFix"])
    samplers = by_class["KSampler"]
    assert len(samplers) == 8 and len({json.dumps(api[s]["inputs"]["seed"]) for s in samplers}) == 1
    seed_src = api[api[samplers[0]]["inputs"]["seed"][0]]
    assert seed_src["class_type"] == "PrimitiveInt" and seed_src["inputs"]["value"] == 42
    (grid_id,) = by_class["DimFixComparisonGrid"]
    grid = api[grid_id]["inputs"]
    images = ["reference"] + [f"image_{k}" for k in range(1, 8) if f"image_{k}" in grid]
    labels = grid["labels"].split("\n")
    assert len(labels) == len(images) == 8 and labels[0] == "Qwen3-4B (reference)"
    assert labels[1:] == [f"Fix: {m}" for m in modes]
    # every grid cell decodes a sampler whose positive comes from the label's fix mode
    for name, label in zip(images, labels):
        sampler = api[api[grid[name][0]]["inputs"]["samples"][0]]
        pos = api[sampler["inputs"]["positive"][0]]
        if label.startswith("Fix: "):
            assert pos["class_type"] == "DimFixEmbeddingDimensionFix" and pos["inputs"]["mode"] == label[5:]
        else:
            assert pos["class_type"] == "CLIPTextEncode"
            assert api[pos["inputs"]["clip"][0]]["class_type"] == "CLIPLoader"
    stock = {"UNETLoader": {"unet_name": "z_image_turbo_bf16.safetensors"}, "ModelSamplingAuraFlow": {"shift": 3.0},
             "CLIPLoader": {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"},
             "VAELoader": {"vae_name": "ae.safetensors"},
             "EmptySD3LatentImage": {"width": 1024, "height": 1024, "batch_size": 1}}
    for cls, expected in stock.items():
        for nid in by_class[cls]:
            assert {k: api[nid]["inputs"][k] for k in expected} == expected
    for s in samplers:
        i = api[s]["inputs"]
        assert (i["cfg"], i["sampler_name"], i["scheduler"], i["denoise"]) == (1.0, "res_multistep", "simple", 1.0)
        assert api[i["negative"][0]]["class_type"] == "ConditioningZeroOut"
    assert any(n["type"] == "MarkdownNote" and "steps" in n["widgets_values"][0] for n in ui["nodes"])


def test_batch_runner_selectors_resolve():
    """The titles the README tells ``python -m dimfix.batch`` to use exist in every sampling workflow."""
    from dimfix.batch import set_input

    for stem in EXPECTED_STEMS:
        if stem == "zimage_dimfix_analyze":
            continue
        _, api = load(stem)
        g = set_input(api, "Prompt", "value", "a test prompt", multiple=True)
        g = set_input(g, "Seed", "value", 7, multiple=True)
        assert [n["inputs"]["value"] for n in g.values() if n["_meta"]["title"] in ("Prompt", "Seed")] == \
            ["a test prompt", 7]


def test_base_workflow_fixes_positive_and_negative_with_one_table():
    _, api = load("zimage_dimfix_base_negative")
    by_class: dict[str, list[str]] = {}
    for nid, node in api.items():
        by_class.setdefault(node["class_type"], []).append(nid)
    (unet,) = by_class["UNETLoader"]
    assert api[unet]["inputs"]["unet_name"] == "z_image_bf16.safetensors"
    (table,) = by_class["DimFixDimensionAnalyzer"]
    texts = {api[n]["_meta"]["title"]: api[n]["inputs"]["value"] for n in by_class["PrimitiveStringMultiline"]}
    assert len(texts["Negative prompt"].split(",")) >= 5 and texts["Negative prompt"] != texts["Prompt"]

    def source(link):  # (class of the encoder's CLIP loader, prompt-node title) of a CLIPTextEncode
        enc = api[link[0]]
        assert enc["class_type"] == "CLIPTextEncode"
        return api[enc["inputs"]["clip"][0]]["class_type"], api[enc["inputs"]["text"][0]]["_meta"]["title"]

    samplers = [api[s]["inputs"] for s in by_class["KSampler"]]
    assert len(samplers) == 3
    for i in samplers:
        assert 3.0 <= i["cfg"] <= 5.0 and 25 <= i["steps"] <= 50
        assert api[i["negative"][0]]["class_type"] != "ConditioningZeroOut"
    fixed = [i for i in samplers if api[i["positive"][0]]["class_type"] == "DimFixEmbeddingDimensionFix"]
    assert len(fixed) == 1
    pos, neg = api[fixed[0]["positive"][0]], api[fixed[0]["negative"][0]]
    assert neg["class_type"] == "DimFixEmbeddingDimensionFix" and pos is not neg
    for fix, prompt in [(pos, "Prompt"), (neg, "Negative prompt")]:
        assert fix["inputs"]["fix_table"] == [table, 0] and fix["inputs"]["mode"] == "auto"
        assert source(fix["inputs"]["conditioning"]) == ("DimFixQwen3EmbeddingLoader", prompt)
    encoded = [i for i in samplers if i is not fixed[0]]
    assert sorted(source(i["positive"])[0] for i in encoded) == ["CLIPLoader", "DimFixQwen3EmbeddingLoader"]
    ref = [i for i in encoded if source(i["positive"])[0] == "CLIPLoader"]
    assert len(ref) == 1 and source(ref[0]["negative"]) == ("CLIPLoader", "Negative prompt")


# ------------------------------------------------------------------------------------------- first open
WINDOW = (1280, 800)
SIDEBAR, TOP_BARS = 60, 90  # the frontend's icon sidebar; its tab bar + floating workflow menu, in pixels
MINIMAP_CORNER = (1015, 535)  # the minimap and canvas toolbar fill the window's bottom-right corner from here
TITLE = 30  # LiteGraph's node title bar, drawn above ``pos``


def screen_box(node: dict, ds: dict) -> tuple[float, float, float, float]:
    """Where LiteGraph draws a node (title bar included): screen = (canvas + offset) · scale."""
    (x, y), (w, h) = node["pos"], node["size"]
    ox, oy = ds["offset"]
    k = ds["scale"]
    return (x + ox) * k, (y - TITLE + oy) * k, (x + w + ox) * k, (y + h + oy) * k


@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_saved_view_shows_every_node_clear_of_the_frontend_chrome(stem):
    ui, _ = load(stem)
    ds = ui["extra"]["ds"]
    assert 0.1 < ds["scale"] <= 1.0
    for n in ui["nodes"]:
        x0, y0, x1, y1 = screen_box(n, ds)
        assert x0 >= SIDEBAR and y0 >= TOP_BARS and x1 <= WINDOW[0] and y1 <= WINDOW[1], (stem, n["id"], n["type"])
        assert x1 <= MINIMAP_CORNER[0] or y1 <= MINIMAP_CORNER[1], (stem, n["id"], n["type"], "under the minimap")


@pytest.mark.parametrize("stem", EXPECTED_STEMS)
def test_read_me_note_opens_top_left_and_names_the_substitute_download(stem):
    ui, _ = load(stem)
    (note,) = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert note.get("title") == "Read me"
    boxes = [screen_box(n, ui["extra"]["ds"]) for n in ui["nodes"]]
    mine = screen_box(note, ui["extra"]["ds"])
    assert mine[0] == min(b[0] for b in boxes) and mine[1] == min(b[1] for b in boxes)
    text = note["widgets_values"][0]
    head = text[:text.index("**Other models**")]
    assert "Qwen3-Embedding-4B" in head and "models/text_encoders/Qwen3-Embedding-4B/" in head
    assert "huggingface.co/Qwen/Qwen3-Embedding-4B" in head


@pytest.mark.parametrize("name", sorted(UI_NAMES.values()))
def test_every_template_has_a_jpeg_thumbnail(name):
    from PIL import Image

    path = WF / f"{name}.jpg"
    assert path.is_file(), f"missing thumbnail {path.name}: run tests/frontend/check_frontend.py --thumbnails"
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.width == im.height >= 256  # template cards are square
        # not a blank frame: the screenshot shows nodes on the canvas
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 60
    assert sorted(p.stem for p in WF.glob("*.jpg")) == sorted(UI_NAMES.values())


@pytest.mark.parametrize("stem", [s for s in EXPECTED_STEMS if s != "zimage_dimfix_analyze"])
def test_grid_subtitle_is_the_prompt(stem):
    _, api = load(stem)
    (grid,) = [v for v in api.values() if v["class_type"] == "DimFixComparisonGrid"]
    assert api[grid["inputs"]["subtitle"][0]]["_meta"]["title"] == "Prompt"


def test_fit_view_keeps_boxes_in_the_free_area_and_off_the_minimap():
    from zdf_testkit.workflow_builder import MINIMAP, VIEW_MARGINS, VIEW_SIZE, fit_view

    rng = np.random.default_rng(3)
    for _ in range(50):
        xy = rng.uniform(-800, 2500, size=(12, 2))
        wh = rng.uniform(40, 700, size=(12, 2))
        boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(xy, wh)]
        ds = fit_view(boxes)
        k, (ox, oy) = ds["scale"], ds["offset"]
        for x0, y0, x1, y1 in boxes:
            sx0, sy0, sx1, sy1 = (x0 + ox) * k, (y0 + oy) * k, (x1 + ox) * k, (y1 + oy) * k
            assert sx0 >= VIEW_MARGINS["left"] - 0.1 and sy0 >= VIEW_MARGINS["top"] - 0.1
            assert sx1 <= VIEW_SIZE[0] - VIEW_MARGINS["right"] + 0.1
            assert sy1 <= VIEW_SIZE[1] - VIEW_MARGINS["bottom"] + 0.1
            assert sx1 <= MINIMAP[0] or sy1 <= MINIMAP[1] or sx0 >= MINIMAP[2] or sy0 >= MINIMAP[3]
