import math

import numpy as np
import pytest
import torch

from dimfix import grid


def _images(n, h, w, seed=0):
    """Distinct, never-white solid-ish images (values 0..200) so placement is checkable."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 200, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]


def _expected_shape(n, h, w, cols=None, lh=60, th=80):
    cols = min(n, 3) if cols is None else cols
    rows = math.ceil(n / cols)
    return rows * (h + lh) + th, cols * w


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("h,w", [(64, 64), (48, 80), (128, 96)])
def test_geometry_and_placement(n, h, w):
    imgs = _images(n, h, w, seed=n)
    labels = [f"Fix: mode{i}\nsim=0.9{i}" for i in range(n)]
    out = grid.compose_grid(imgs, labels, subtitle='Prompt: "a cat" (seed=42)')
    assert out.dtype == np.uint8 and out.shape == (*_expected_shape(n, h, w), 3)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    covered = np.zeros(out.shape[:2], dtype=bool)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        x, y = c * w, 80 + r * (h + 60)
        assert np.array_equal(out[y:y + h, x:x + w], img), f"image {i} misplaced"
        covered[y:y + h, x:x + w] = True
        band = out[y + h:y + h + 60, x:x + w]
        assert (band < 250).any(), f"label {i} not rendered in its band"
        covered[y + h:y + h + 60, x:x + w] = True
    # title band has ink
    assert (out[:80] < 250).any()
    covered[:80] = True
    # everything else (empty cells of the last row) is pure white
    assert (out[~covered] == 255).all()
    # empty trailing cells: white
    for i in range(n, rows * cols):
        r, c = divmod(i, cols)
        assert (out[80 + r * (h + 60):80 + (r + 1) * (h + 60), c * w:(c + 1) * w] == 255).all()


def test_origin_geometry_at_1024_is_parity():
    # 6 images of 1024² in the original produced 3072 × 2248
    assert _expected_shape(6, 1024, 1024) == (2248, 3072)
    # verify with a cheap stand-in: the formula used by compose_grid on small images
    out = grid.compose_grid(_images(6, 32, 32), ["a"] * 6)
    assert out.shape[:2] == _expected_shape(6, 32, 32)


def test_custom_cols_and_bands():
    imgs = _images(5, 40, 30)
    out = grid.compose_grid(imgs, list("abcde"), cols=2, label_height=20, title_height=0)
    assert out.shape[:2] == (3 * (40 + 20), 2 * 30)
    assert np.array_equal(out[60:100, 30:60], imgs[3])  # row 1, col 1
    out = grid.compose_grid(imgs, list("abcde"), cols=10)  # clamped to n
    assert out.shape[:2] == (40 + 60 + 80, 5 * 30)


def test_no_title_no_labels_is_pure_white_bands():
    imgs = _images(2, 16, 16)
    out = grid.compose_grid(imgs, None, title="", subtitle=None)
    assert (out[:80] == 255).all()
    assert (out[96:156] == 255).all()


def test_float_tensors_and_mixed_sizes_pad_centred():
    a = torch.zeros(20, 30, 3)  # black, smaller
    b = torch.full((1, 40, 50, 3), 0.5)  # batch of one, larger
    out = grid.compose_grid([a, b], ["a", "b"], title_height=0, label_height=0)
    assert out.shape == (40, 100, 3)
    # a centred in the 50×40 cell: offset (10, 10)
    assert (out[10:30, 10:40] == 0).all()
    assert (out[:10, :50] == 255).all() and (out[30:40, :50] == 255).all()
    assert (out[:, 50:] == 128).all()


def test_resize_fit_fills_cell():
    a = np.zeros((20, 25, 3), dtype=np.uint8)
    b = np.full((40, 50, 3), 100, dtype=np.uint8)
    out = grid.compose_grid([a, b], None, title_height=0, label_height=0, fit="resize")
    assert (out[:, :50] == 0).all()


def test_long_labels_stay_in_their_band():
    imgs = _images(3, 64, 64)
    long = "Fix: full moment match with clamp and a really very long description " * 3
    out = grid.compose_grid(imgs, [long, "x" * 200, "short\nsecond\nthird\nfourth"], title="T " * 80)
    for i, img in enumerate(imgs):
        assert np.array_equal(out[80:144, i * 64:(i + 1) * 64], img)
        band = out[144:204, i * 64:(i + 1) * 64]
        assert (band < 250).any()


def test_grey_and_rgba_inputs():
    grey = np.full((8, 8), 0.25, dtype=np.float32)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    out = grid.compose_grid([grey, rgba], None, title_height=0, label_height=0)
    assert (out[:, :8] == 64).all() and (out[:, 8:] == 0).all()


def test_nan_float_input_does_not_crash():
    img = np.full((8, 8, 3), np.nan, dtype=np.float32)
    out = grid.compose_grid([img], ["nan"])
    assert out.shape == (8 + 60 + 80, 8, 3)


def test_errors():
    with pytest.raises(ValueError, match="no images"):
        grid.compose_grid([], [])
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        grid.compose_grid(_images(2, 4, 4), ["a"])
    with pytest.raises(ValueError, match=r"images\[0\].*shape"):
        grid.compose_grid([np.zeros((4, 4, 2))], ["a"])
    with pytest.raises(ValueError, match="fit"):
        grid.compose_grid(_images(1, 4, 4), ["a"], fit="stretch")


def test_grid_to_tensor():
    imgs = _images(2, 16, 24)
    t = grid.grid_to_tensor(imgs, ["a", "b"], subtitle="s")
    arr = grid.compose_grid(imgs, ["a", "b"], subtitle="s")
    assert t.dtype == torch.float32 and tuple(t.shape) == (1, *arr.shape)
    assert torch.allclose(t[0] * 255, torch.from_numpy(arr).float(), atol=1e-3)


def test_pillow_default_font_fallback_without_matplotlib(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    imgs = _images(2, 64, 64)
    out = grid.compose_grid(imgs, ["Fix: rescale\nsim=0.912", "ref"], subtitle="s")
    assert out.shape == (64 + 60 + 80, 128, 3)
    assert (out[144:204] < 250).any() and (out[:80] < 250).any()
    assert np.array_equal(out[80:144, :64], imgs[0])


def test_fonts_are_dejavu_when_matplotlib_present():
    font = grid._font_loader(True)(20)
    assert "DejaVu" in font.getname()[0]
