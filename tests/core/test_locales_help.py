"""Every pack node has a help page (web/docs/<NodeId>.md + zh.md) and a zh locale entry for itself, each input
and each output, in the format the ComfyUI frontend reads (/i18n merges locales/<lang>/nodeDefs.json)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from zdf_testkit.workflow_specs import load_specs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "web" / "docs"
ZH = ROOT / "locales" / "zh"
SPECS = load_specs()
PACK_NODES = sorted(k for k in SPECS if k.startswith("DimFix"))
CJK = re.compile(r"[\u4e00-\u9fff]")


def node_ids_in_source() -> set[str]:
    """``node_id="..."`` of every V3 schema in nodes/*.py (read as text: no ComfyUI import)."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(call, ast.keyword) and call.arg == "node_id" and isinstance(call.value, ast.Constant):
                ids.add(call.value.value)
    return ids


def test_specs_cover_every_node_of_the_pack():
    assert set(PACK_NODES) == node_ids_in_source() and len(PACK_NODES) == 6


def test_web_directory_is_declared_and_holds_the_docs():
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    values = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "WEB_DIRECTORY" for t in n.targets)]
    assert values and (ROOT / values[0] / "docs").resolve() == DOCS.resolve()


@pytest.mark.parametrize("node", PACK_NODES)
def test_help_page_documents_every_input(node):
    text = (DOCS / f"{node}.md").read_text(encoding="utf-8")
    assert text.startswith("# ")
    missing = [i["name"] for i in SPECS[node]["inputs"] if f"`{i['name']}`" not in text]
    assert not missing, f"web/docs/{node}.md does not mention {missing}"


@pytest.mark.parametrize("node", PACK_NODES)
def test_english_locale_page_equals_the_fallback(node):
    """The frontend asks for docs/<NodeId>/<locale>.md first (a 404 in the console when missing), then
    docs/<NodeId>.md; the English copy must not drift from the fallback other locales get."""
    assert (DOCS / node / "en.md").read_bytes() == (DOCS / f"{node}.md").read_bytes()


@pytest.mark.parametrize("node", PACK_NODES)
def test_chinese_help_page_exists(node):
    text = (DOCS / node / "zh.md").read_text(encoding="utf-8")
    assert text.startswith("# ") and len(CJK.findall(text)) > 50


def test_zh_locale_files_are_json_objects():
    for name in ("main.json", "nodeDefs.json"):
        assert isinstance(json.loads((ZH / name).read_text(encoding="utf-8")), dict)
    main = json.loads((ZH / "main.json").read_text(encoding="utf-8"))
    assert set(main) <= {"nodeCategories", "nodeDefs", "commands", "settings", "menuLabels", "sideToolbar"}


@pytest.mark.parametrize("node", PACK_NODES)
def test_zh_locale_names_every_input_and_output(node):
    defs = json.loads((ZH / "nodeDefs.json").read_text(encoding="utf-8"))[node]
    assert CJK.search(defs["display_name"]) and CJK.search(defs["description"])
    spec = SPECS[node]
    for i in spec["inputs"]:
        entry = defs["inputs"].get(i["name"])
        assert entry and entry["name"] and CJK.search(entry["tooltip"]), (node, i["name"])
    assert sorted(defs["outputs"], key=int) == [str(k) for k in range(len(spec["outputs"]))]
    for entry in defs["outputs"].values():
        assert entry["name"] and CJK.search(entry["tooltip"])
    unknown = set(defs["inputs"]) - {i["name"] for i in spec["inputs"]}
    assert not unknown, f"stale zh entries (renamed inputs?): {sorted(unknown)}"
