"""Labelled comparison grid (reference image + one image per fix mode, or any image set).

Layout (the original research grid's geometry, kept for parity):

- cells are ``W × H`` where ``W``/``H`` are the largest image width/height; ``cols = min(n, 3)``
  by default, ``rows = ceil(n / cols)``;
- canvas ``(cols·W) × (rows·(H + label_height) + title_height)``, white;
- the title is centred in the top band (at ¼ of its height when there is a subtitle, else in the middle),
  the subtitle (e.g. ``Prompt: "…" (seed=42)``) below it (at ⅝) in grey;
- image ``i`` (row-major) goes at ``x = col·W``, ``y = title_height + row·(H + label_height)``; its label
  (may contain ``"\\n"``) is centred in the ``label_height`` band right below the cell.

Images of different sizes: with ``fit="pad"`` (default) each image keeps its pixels and is centred in
its cell on white; with ``fit="resize"`` it is scaled (aspect kept, Lanczos) to fit the cell, then
centred. Text is drawn inside its own band only (never over images); long text wraps at spaces, then
shrinks, then is cut with an ellipsis. Font sizes scale with the cell width (16 / 20 px at 1024 px,
as in the original; ∝ √width down to 8 / 10 px for cells ≤ 256 px). Fonts: DejaVu Sans bundled with
matplotlib when it is installed, else Pillow's default font.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["compose_grid", "grid_to_tensor", "to_uint8_rgb"]

_SUBTITLE_GREY = (110, 110, 110)
_TEXT_BLACK = (0, 0, 0)
_MIN_FONT = 6


def to_uint8_rgb(image: Any, name: str = "image") -> np.ndarray:
    """HWC (or 1×HWC) float 0..1 / uint8 array or tensor → uint8 ``[H, W, 3]`` (grey → RGB, alpha dropped)."""
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = image.float()
        image = image.numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected an image [H, W, 3] (or [1, H, W, 3]), got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        f = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        out = np.round(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] == 4:
        out = out[:, :, :3]
    return np.ascontiguousarray(out)


def _font_loader(bold: bool) -> Callable[[int], Any]:
    """Return ``size -> font``: DejaVu Sans (matplotlib's copy) when available, else Pillow's default."""
    from PIL import ImageFont

    path = None
    if importlib.util.find_spec("matplotlib") is not None:  # optional: only its bundled fonts are used
        import matplotlib

        candidate = os.path.join(matplotlib.get_data_path(), "fonts", "ttf",
                                 "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
        if os.path.isfile(candidate):
            path = candidate
    cache: dict[int, Any] = {}

    def load(size: int) -> Any:
        size = max(1, int(size))
        if size not in cache:
            if path is not None:
                cache[size] = ImageFont.truetype(path, size)
            else:
                try:
                    cache[size] = ImageFont.load_default(size=size)
                except TypeError:  # Pillow < 10.1: fixed-size bitmap font
                    cache[size] = ImageFont.load_default()
        return cache[size]

    return load


def _text_w(draw: Any, text: str, font: Any) -> float:
    return draw.textlength(text, font=font)


def _line_h(font: Any) -> int:
    box = font.getbbox("Hgjy|")
    return int(box[3] - box[1])


def _wrap(draw: Any, text: str, font: Any, max_w: float) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        words = para.split(" ")
        cur = ""
        for word in words:
            trial = word if not cur else cur + " " + word
            if cur and _text_w(draw, trial, font) > max_w:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    return lines


def _ellipsize(draw: Any, line: str, font: Any, max_w: float) -> str:
    if _text_w(draw, line, font) <= max_w:
        return line
    while line and _text_w(draw, line + "…", font) > max_w:
        line = line[:-1]
    return line + "…" if line else ""


def _fit(draw: Any, text: str, load: Callable[[int], Any], size: int, max_w: float, max_h: float,
         gap: float = 0.25) -> tuple[Any, list[str], int]:
    """Largest font ≤ ``size`` whose wrapped lines fit ``max_w × max_h``; last resort: ellipsis."""
    for s in range(int(size), _MIN_FONT - 1, -1):
        font = load(s)
        lines = _wrap(draw, text, font, max_w)
        lh = _line_h(font)
        step = int(math.ceil(lh * (1 + gap)))
        total = lh + step * (len(lines) - 1)
        if total <= max_h and all(_text_w(draw, ln, font) <= max_w for ln in lines):
            return font, lines, step
    font = load(_MIN_FONT)
    lh = _line_h(font)
    step = int(math.ceil(lh * (1 + gap)))
    n_fit = max(1, int((max_h - lh) // step) + 1) if max_h >= lh else 1
    lines = _wrap(draw, text, font, max_w)
    if len(lines) > n_fit:
        lines = lines[:n_fit]
        lines[-1] = lines[-1] + "…"
    return font, [_ellipsize(draw, ln, font, max_w) for ln in lines], step


def _band(width: int, height: int, items: Sequence[tuple[str, Callable[[int], Any], int, tuple, float, float]]) -> Any:
    """A white ``width × height`` band with text blocks ``(text, loader, size, colour, cy, max_h)``.

    Each block is centred horizontally and vertically around ``cy`` and fitted inside ``max_h``.
    Drawing on a separate band guarantees text never spills over the images.
    """
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    margin = max(2, width // 64)
    for text, load, size, colour, cy, max_h in items:
        if not text or max_h < 1:
            continue
        font, lines, step = _fit(draw, text, load, size, width - 2 * margin, max_h)
        lh = _line_h(font)
        total = lh + step * (len(lines) - 1)
        y0 = cy - total / 2.0
        for k, line in enumerate(lines):
            draw.text((width / 2.0, y0 + k * step + lh / 2.0), line, fill=colour, font=font, anchor="mm")
    return band


def _fit_image(img: np.ndarray, cell_w: int, cell_h: int, fit: str) -> np.ndarray:
    h, w = img.shape[:2]
    if fit == "resize" and (h, w) != (cell_h, cell_w):
        from PIL import Image

        scale = min(cell_w / w, cell_h / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.LANCZOS))
        h, w = nh, nw
    if (h, w) == (cell_h, cell_w):
        return img
    cell = np.full((cell_h, cell_w, 3), 255, dtype=np.uint8)
    y, x = (cell_h - h) // 2, (cell_w - w) // 2
    cell[y:y + h, x:x + w] = img
    return cell


def compose_grid(
    images: Sequence[Any],
    labels: Sequence[str] | None = None,
    title: str = "Dimension Fix Comparison",
    subtitle: str | None = None,
    cols: int | None = None,
    label_height: int = 60,
    title_height: int = 80,
    fit: str = "pad",
) -> np.ndarray:
    """Compose labelled images into one grid (layout in the module docstring); returns uint8 ``[H, W, 3]``."""
    from PIL import Image

    imgs = [to_uint8_rgb(im, name=f"images[{i}]") for i, im in enumerate(images)]
    n = len(imgs)
    if n == 0:
        raise ValueError("compose_grid: no images given (expected at least one HWC image)")
    labels = [""] * n if labels is None else [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"compose_grid: {n} images but {len(labels)} labels (expected one label per image)")
    if fit not in ("pad", "resize"):
        raise ValueError(f"compose_grid: fit must be 'pad' or 'resize', got {fit!r}")
    if cols is None:
        cols = min(n, 3)
    if int(cols) < 1:
        raise ValueError(f"compose_grid: cols must be >= 1, got {cols}")
    cols = min(int(cols), n)
    if label_height < 0 or title_height < 0:
        raise ValueError("compose_grid: label_height and title_height must be >= 0")
    rows = math.ceil(n / cols)
    cell_w = max(im.shape[1] for im in imgs)
    cell_h = max(im.shape[0] for im in imgs)
    width = cols * cell_w
    height = rows * (cell_h + label_height) + title_height
    canvas = Image.new("RGB", (width, height), (255, 255, 255))

    scale = min(max(math.sqrt(cell_w / 1024.0), 0.5), 2.0)  # 16 px labels at 1024, 8 px at <= 256
    regular, bold = _font_loader(False), _font_loader(True)
    label_px = max(_MIN_FONT, round(16 * scale))
    title_px = max(_MIN_FONT, round(20 * scale))
    sub_px = max(_MIN_FONT, round(16 * scale))

    if title_height > 0 and (title or subtitle):
        if subtitle:
            items = [(title, bold, title_px, _TEXT_BLACK, title_height * 0.25, title_height * 0.45),
                     (subtitle, regular, sub_px, _SUBTITLE_GREY, title_height * 0.625, title_height * 0.35)]
        else:
            items = [(title, bold, title_px, _TEXT_BLACK, title_height * 0.5, title_height * 0.8)]
        canvas.paste(_band(width, title_height, items), (0, 0))

    for i, (img, label) in enumerate(zip(imgs, labels)):
        row, col = divmod(i, cols)
        x = col * cell_w
        y = title_height + row * (cell_h + label_height)
        canvas.paste(Image.fromarray(_fit_image(img, cell_w, cell_h, fit)), (x, y))
        if label_height > 0 and label:
            band = _band(cell_w, label_height,
                         [(label, regular, label_px, _TEXT_BLACK, label_height / 2.0, label_height * 0.9)])
            canvas.paste(band, (x, y + cell_h))
    return np.asarray(canvas, dtype=np.uint8).copy()


def grid_to_tensor(*args: Any, **kwargs: Any) -> Any:
    """:func:`compose_grid` as a ComfyUI IMAGE: float32 torch tensor ``[1, H, W, 3]`` in 0..1."""
    import torch

    arr = compose_grid(*args, **kwargs)
    return torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(0)
