"""``--sweep`` cross products, ``--fetch-node`` selection and the ``index.html`` contact sheet."""

import html
import json
import re

import pytest

from dimfix import batch
from dimfix.batch import ComfyClient
from dimfix.compare import verdict
from zdf_testkit.comfy_stub import running

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 0, "steps": 2, "cfg": 1.0, "model": ["4", 0],
                                               "positive": ["14", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "old", "clip": ["4", 1]}, "_meta": {"title": "Prompt"}},
    "14": {"class_type": "DimFixEmbeddingDimensionFix", "inputs": {"conditioning": ["6", 0], "mode": "none",
                                                                   "strength": 1.0}, "_meta": {"title": "Fix"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    "12": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
}


@pytest.fixture
def stub():
    with running() as s:
        yield s


def test_parse_sweep_resolves_nodes_and_types_values():
    s = batch.parse_sweep(GRAPH, "Fix.mode=none,rescale,affine")
    assert (s.node_ids, s.name, s.values) == (("14",), "mode", ("none", "rescale", "affine"))
    assert batch.parse_sweep(GRAPH, "steps=2, 4").values == (2, 4)
    assert batch.parse_sweep(GRAPH, "3.cfg=1,2.5").values == (1.0, 2.5)
    assert batch.parse_sweep(GRAPH, "DimFixEmbeddingDimensionFix.strength=0.5").node_ids == ("14",)
    for spec, msg in [("mode", "expected NODE.INPUT=a,b,c"), ("mode=a,,b", "none empty"),
                      ("steps=two", "'two' is not a int"), ("Nope.mode=a", "no node matches 'Nope'"),
                      ("nothing=a", "no node has a literal input 'nothing'"), ("3.model=1", "connected to node 4"),
                      ("Fix.mode=a,a", "repeated")]:
        with pytest.raises(batch.WorkflowError, match=re.escape(msg)):
            batch.parse_sweep(GRAPH, spec)


def test_sweep_is_a_cross_product_sharing_the_prompt_seed(stub, tmp_path):
    out = tmp_path / "o"
    res = batch.run_batch(ComfyClient(stub.url), GRAPH, ["A cat", "A dog"], "Prompt", seed_selector="3", seed=9,
                          out_dir=out, poll_interval=0.002, sweeps=["Fix.mode=none,affine", "steps=2,4"])
    assert len(res) == 8 and all(r.status == "ok" for r in res)
    sent = sorted((b["prompt"]["6"]["inputs"]["text"], b["prompt"]["14"]["inputs"]["mode"],
                   b["prompt"]["3"]["inputs"]["steps"], b["prompt"]["3"]["inputs"]["seed"]) for _, b in stub.queued)
    assert sent == sorted((p, m, st, seed) for p, seed in (("A cat", 9), ("A dog", 10))
                          for m in ("none", "affine") for st in (2, 4))
    assert res[3].sweep == {"Fix.mode": "affine", "steps": 4}
    assert res[3].files == ["000_a-cat_s3-affine-4_9_0.png", "000_a-cat_s3-affine-4_9_1.png"]
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["sweep"]
    again = batch.run_batch(ComfyClient(stub.url), GRAPH, ["A cat", "A dog"], "Prompt", seed_selector="3", seed=9,
                            out_dir=out, poll_interval=0.002, sweeps=["Fix.mode=none,affine", "steps=2,4"])
    assert [r.status for r in again] == ["skipped"] * 8


def test_fetch_nodes_selects_exactly_those_images(stub, tmp_path):
    res = batch.run_batch(ComfyClient(stub.url), GRAPH, ["a"], "Prompt", out_dir=tmp_path / "o",
                          poll_interval=0.002, fetch_nodes=["PreviewImage"])
    assert res[0].files == ["000_a_12_0.png"]
    res = batch.run_batch(ComfyClient(stub.url), {k: v for k, v in GRAPH.items() if k != "9"}, ["a"], "Prompt",
                          out_dir=tmp_path / "p", poll_interval=0.002)
    assert res[0].status == "error" and "no image matches --fetch output" in res[0].error
    assert "node 12 (temp)" in res[0].error
    entry = {"outputs": {"9": {"images": [{"filename": "a.png", "type": "output"}]},
                         "12": {"images": [{"filename": "b.png", "type": "temp"}]}}}
    assert [r["filename"] for r in batch.select_images(entry)] == ["a.png"]
    assert [r["filename"] for r in batch.select_images(entry, "all")] == ["a.png", "b.png"]
    assert [r["filename"] for r in batch.select_images(entry, node_ids=frozenset({"12"}))] == ["b.png"]


def _report(passed: bool) -> str:
    v = verdict(0.99, 0.97 if passed else 0.5, 0.95, 3)
    return (f"# Dimension analysis\n\n## Verdict (layer -2)\n\n{v.to_markdown()}\n\n"
            "## Most different dimensions\n\n| x |")


def test_extract_verdict_from_an_analyzer_report():
    text = batch.extract_verdict(_report(False))
    assert text.startswith("## Verdict (layer -2)") and text.endswith("**Verdict: FAIL**")
    assert "| std correlation | 0.5000 | > 0.95 | NO |" in text and "Most different" not in text
    assert batch.extract_verdict("no verdict here") is None


def test_contact_sheet_rows_links_escaping_and_verdicts(stub, tmp_path):
    graph = {**GRAPH, "20": {"class_type": "PreviewAny", "inputs": {"source": _report(True)}}}
    out = tmp_path / "o"
    report = tmp_path / "report.md"
    report.write_text(_report(False), encoding="utf-8")
    prompts = ['A <script>alert("x")</script> & cat', "A dog"]
    batch.run_batch(ComfyClient(stub.url), graph, prompts, "Prompt", out_dir=out, poll_interval=0.002,
                    sweeps=["Fix.mode=none,affine"], verdict_text=report.read_text())
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in page and html.escape(prompts[0]) in page
    assert len(re.findall(r"<tr><td>\d+</td>", page)) == 4  # one row per prompt × sweep value
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 8 and all("/" not in s and (out / s).is_file() for s in srcs)  # relative, existing
    assert "Fix.mode = affine" in page
    assert page.count("**Verdict: PASS**") == 4  # per row, from the history's text output
    assert page.count("**Verdict: FAIL**") == 1  # the --verdict report, above the table
    assert not re.search(r'(src|href)="[a-z]+:', page) and "<script" not in page  # nothing remote, no script


def test_cli_sweep_and_verdict_file(stub, tmp_path, capsys):
    wf, report, out = tmp_path / "wf.json", tmp_path / "r.md", tmp_path / "o"
    wf.write_text(json.dumps(GRAPH))
    report.write_text(_report(True))
    args = ["--server", stub.url, "--workflow", str(wf), "--prompt-node", "Prompt", "--out", str(out), "--limit", "1",
            "--poll", "0.002", "--quiet", "--sweep", "Fix.mode=none,rescale", "--verdict", str(report)]
    assert batch.main(args) == 0
    assert len(stub.queued) == 2 and "**Verdict: PASS**" in (out / "index.html").read_text()
    assert batch.main(args + ["--sweep", "Fix.mode"]) == 2
    assert "expected NODE.INPUT=a,b,c" in capsys.readouterr().err
    assert batch.main(args + ["--fetch", "all", "--fetch-node", "9"]) == 2


def test_save_nodes_add_a_save_per_matched_node(stub, tmp_path):
    graph, added = batch.add_save_nodes(GRAPH, ["KSampler", "Fix"])
    assert added == ["dimfix_save_3", "dimfix_save_14"] and "dimfix_save_3" not in GRAPH
    assert graph["dimfix_save_3"]["inputs"]["images"] == ["3", 0]
    assert graph["dimfix_save_3"]["_meta"]["title"] == "Save · CheckpointLoaderSimple → KSampler"
    assert graph["dimfix_save_14"]["_meta"]["title"] == "Save · Fix"
    with pytest.raises(batch.WorkflowError, match="save node 'Nope': no node matches"):
        batch.add_save_nodes(GRAPH, ["Nope"])
    out = tmp_path / "o"
    res = batch.run_batch(ComfyClient(stub.url), GRAPH, ["a"], "Prompt", out_dir=out, poll_interval=0.002,
                          save_nodes=["KSampler"], fetch_nodes=["9"])
    assert res[0].files == ["000_a_9_0.png", "000_a_9_1.png", "000_a_dimfix-save-3_0.png",
                            "000_a_dimfix-save-3_1.png"]
    assert stub.queued[0][1]["prompt"]["dimfix_save_3"]["class_type"] == "SaveImage"
    assert "Save · CheckpointLoaderSimple → KSampler · 000_a_dimfix-save-3_0.png" in (out / "index.html").read_text()
