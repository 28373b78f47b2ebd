"""Fix Comparison Grid: compose labelled images (reference + one per fix mode) into one image."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..dimfix.grid import grid_to_tensor
from . import comfy_access as host
from .common import CATEGORY

log = logging.getLogger(__name__)

NODE = "Fix Comparison Grid"
#: Optional image inputs after "reference" (8 images in total).
EXTRA_IMAGES = tuple(f"image_{i}" for i in range(1, 8))
FITS = ("pad", "resize")
DEFAULT_TITLE = "Dimension Fix Comparison"


def parse_labels(text: str, slots: int) -> list[str]:
    """One label per line for each input slot (line 1 = reference, line k+1 = image_k).

    A literal ``\\n`` (backslash, n) inside a line becomes a line break in that label. Missing lines give
    empty labels; lines beyond ``slots`` are ignored with a log message.
    """
    lines = (text or "").replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > slots:
        log.info("%s: %d label lines for %d image inputs; the extra lines are ignored", NODE, len(lines), slots)
    lines = (lines + [""] * slots)[:slots]
    return [line.strip().replace("\\n", "\n") for line in lines]


def collect(images: list, labels: list[str]) -> tuple[list[torch.Tensor], list[str]]:
    """Connected inputs in slot order, one cell per batch item (extra items get " [k]" label suffixes)."""
    cells, names = [], []
    for slot, (image, label) in enumerate(zip(images, labels)):
        if image is None:
            continue
        socket = "reference" if slot == 0 else EXTRA_IMAGES[slot - 1]
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"{NODE}: input '{socket}' must be an IMAGE [batch, height, width, 3], got {shape}")
        for b in range(image.shape[0]):
            cells.append(image[b])
            names.append(label if b == 0 else f"{label} [{b + 1}]".strip())
    return cells, names


class ComparisonGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return host.schema(
            node_id="DimFixComparisonGrid",
            search_aliases=["dimfix", "comparison grid", "image grid", "labelled grid"],
            display_name="Fix Comparison Grid",
            category=CATEGORY,
            description="Composes up to 8 images (e.g. the Qwen3-4B reference and one image per fix mode, same "
                        "seed) into one labelled grid with a title and a subtitle, previews it and outputs it as "
                        "an IMAGE for Save Image. Batched inputs give one cell per image.",
            is_output_node=True,
            inputs=[
                io.Image.Input("reference", tooltip="First cell, e.g. the image from the reference encoder."),
                io.String.Input("labels", multiline=True, default="",
                                tooltip="One label per line, in input order: line 1 labels 'reference', line 2 "
                                        "'image_1', … (lines of unconnected inputs are skipped with them). Write "
                                        "\\n inside a line for a line break in the label."),
                io.String.Input("title", default=DEFAULT_TITLE, tooltip="Bold title above the grid (empty = none)."),
                io.String.Input("subtitle", default="",
                                tooltip="Grey line below the title, e.g. the prompt and seed. Can be converted "
                                        "to an input and linked from a text node."),
                io.Int.Input("columns", default=0, min=0, max=8,
                             tooltip="Cells per row; 0 = automatic (min(number of images, 3))."),
                io.Combo.Input("fit", options=list(FITS), default="pad",
                               tooltip="Images of different sizes: pad = keep pixels, centred on white in the "
                                       "largest cell; resize = scale to fit the cell (aspect kept)."),
                *[io.Image.Input(name, optional=True, tooltip=f"Cell {i + 2} (optional).")
                  for i, name in enumerate(EXTRA_IMAGES)],
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="The grid as one image [1, height, width, 3]."),
            ],
        )

    @classmethod
    def execute(cls, reference, labels: str = "", title: str = DEFAULT_TITLE, subtitle: str = "",
                columns: int = 0, fit: str = "pad", **extra) -> io.NodeOutput:
        unknown = sorted(set(extra) - set(EXTRA_IMAGES))
        if unknown:
            raise ValueError(f"{NODE}: unknown input(s) {unknown}; image inputs are {list(EXTRA_IMAGES)}")
        if reference is None:
            raise ValueError(f"{NODE}: input 'reference' is required (an IMAGE)")
        images = [reference, *(extra.get(name) for name in EXTRA_IMAGES)]
        cells, names = collect(images, parse_labels(labels, len(images)))
        if int(columns) < 0:
            raise ValueError(f"{NODE}: columns must be >= 0 (0 = automatic), got {columns}")
        grid = grid_to_tensor(cells, names, title=title or "", subtitle=subtitle or None,
                              cols=int(columns) or None, fit=fit)
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))
