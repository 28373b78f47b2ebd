"""Fix Comparison Grid inside a real ComfyUI: schema, grid equals dimfix.grid, labels, batches, preview file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

NODE_ID = "DimFixComparisonGrid"


@pytest.fixture(scope="module")
def node(pack):
    return pack.nodes[NODE_ID]


def img(h, w, value, batch=1):
    g = torch.Generator().manual_seed(int(value * 1000))
    return torch.rand(batch, h, w, 3, generator=g) * 0.2 + value * 0.8


def test_schema(node):
    schema = node.GET_SCHEMA()
    schema.validate()
    info = node.GET_NODE_INFO_V1()
    assert info["display_name"] == "Fix Comparison Grid" and info["category"] == "Z-Image DimFix"
    assert info["description"] and info["output_node"] and info["output"] == ["IMAGE"]
    assert list(info["input"]["required"]) == ["reference", "labels", "title", "subtitle", "columns", "fit"]
    assert list(info["input"]["optional"]) == [f"image_{i}" for i in range(1, 8)]
    for key, spec in {**info["input"]["required"], **info["input"]["optional"]}.items():
        assert spec[1].get("tooltip"), key
    assert info["input"]["required"]["title"][1]["default"] == "Dimension Fix Comparison"
    assert all(info["output_tooltips"])


def test_grid_equals_compose_grid_and_preview_is_saved(node, pack, comfy):
    images = [img(64, 64, v) for v in (0.1, 0.3, 0.5, 0.7, 0.9, 0.2)]
    labels = "Qwen3-4B\\n(reference)\nFix: none\nFix: rescale\nFix: mask\nFix: clamp\nFix: full"
    out = node.execute(reference=images[0], labels=labels, title="Dimension Fix Comparison",
                       subtitle='Prompt: "a cat" (seed=42)', columns=0, fit="pad",
                       **{f"image_{i}": im for i, im in enumerate(images[1:], start=1)})
    grid = out.args[0]
    expected = pack.core.grid.compose_grid(
        [im[0] for im in images], ["Qwen3-4B\n(reference)", "Fix: none", "Fix: rescale", "Fix: mask", "Fix: clamp",
                                   "Fix: full"], title="Dimension Fix Comparison",
        subtitle='Prompt: "a cat" (seed=42)')
    # 3 columns × 2 rows of 64² cells, 60 px label bands, 80 px title band
    assert expected.shape == (2 * (64 + 60) + 80, 3 * 64, 3)
    assert grid.shape == (1, *expected.shape) and grid.dtype == torch.float32
    assert np.array_equal(np.round(grid[0].numpy() * 255).astype(np.uint8), expected)
    saved = out.ui.as_dict()["images"]
    assert len(saved) == 1
    ref = saved[0]
    path = comfy.folder_paths.get_temp_directory() + "/" + (ref["subfolder"] + "/" if ref["subfolder"] else "") \
        + ref["filename"]
    with Image.open(path) as png:
        assert png.size == (expected.shape[1], expected.shape[0])


def test_unconnected_slots_skip_their_labels_and_columns(node, pack):
    a, b = img(32, 48, 0.2), img(32, 48, 0.8)
    out = node.execute(reference=a, labels="ref\nunused one\nsecond", title="T", subtitle="", columns=1, fit="pad",
                       image_2=b).args[0]
    expected = pack.core.grid.compose_grid([a[0], b[0]], ["ref", "second"], title="T", cols=1)
    assert out.shape == (1, 2 * (32 + 60) + 80, 48, 3)
    assert np.array_equal(np.round(out[0].numpy() * 255).astype(np.uint8), expected)


def test_batches_expand_and_missing_labels_are_empty(node, pack):
    a, b = img(16, 16, 0.4, batch=2), img(16, 16, 0.6)
    out = node.execute(reference=a, labels="", title="", subtitle="", columns=0, fit="resize", image_1=b).args[0]
    expected = pack.core.grid.compose_grid([a[0], a[1], b[0]], ["", " [2]".strip(), ""], title="", fit="resize")
    assert out.shape == (1, 16 + 60 + 80, 3 * 16, 3)
    assert np.array_equal(np.round(out[0].numpy() * 255).astype(np.uint8), expected)


def test_labels_parsing(pack):
    import importlib

    grid_mod = importlib.import_module(pack.name + ".nodes.grid")
    assert grid_mod.parse_labels("a\\nb\n  c  \n\n", 3) == ["a\nb", "c", ""]
    assert grid_mod.parse_labels("x\ny\nz", 2) == ["x", "y"]
    assert grid_mod.parse_labels("", 2) == ["", ""]


def test_bad_inputs(node):
    with pytest.raises(ValueError, match="'image_1' must be an IMAGE"):
        node.execute(reference=img(8, 8, 0.5), labels="", title="", subtitle="", columns=0, fit="pad",
                     image_1=torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match="unknown input"):
        node.execute(reference=img(8, 8, 0.5), labels="", title="", subtitle="", columns=0, fit="pad",
                     image_9=img(8, 8, 0.5))
