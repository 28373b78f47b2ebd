import warnings

import numpy as np
import pytest
import torch

from dimfix import plots

D = 512


def _sigmas(seed=0, outliers=True):
    rng = np.random.default_rng(seed)
    ref = np.exp(rng.normal(0.0, 0.4, D))
    tgt = ref * np.exp(rng.normal(0.0, 0.1, D))
    if outliers:
        tgt[7] = ref[7] * 40.0
        tgt[396] = ref[396] / 600.0
    return ref, tgt


def _check(img, size=plots.DEFAULT_SIZE):
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8
    assert img.shape == (size[1], size[0], 3)
    assert img.var() > 0
    # mostly white figure background with ink
    assert (img == 255).all(axis=2).mean() > 0.2
    assert (img < 128).any()


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_ratio_histogram_shape_and_outlier_changes_image():
    ref, tgt = _sigmas(outliers=False)
    base = plots.ratio_histogram(np.log10(tgt / ref))
    _check(base)
    ref2, tgt2 = _sigmas(outliers=True)
    with_out = plots.ratio_histogram(np.log10(tgt2 / ref2))
    _check(with_out)
    assert not np.array_equal(base, with_out)
    # deterministic
    assert np.array_equal(with_out, plots.ratio_histogram(np.log10(tgt2 / ref2)))


def test_ratio_histogram_accepts_tensor_and_custom_size():
    img = plots.ratio_histogram(torch.linspace(-1, 1, 100), tau=10.0, size=(640, 480))
    _check(img, (640, 480))


@pytest.mark.parametrize("values", [
    np.array([np.nan, np.inf, -np.inf]),
    np.array([]),
    np.zeros(10),
    np.array([0.0, np.nan, 1.0, -np.inf, 2.0]),
])
def test_ratio_histogram_degenerate_inputs(values):
    _check(plots.ratio_histogram(values))


def test_sigma_scatter_and_zero_sigmas():
    ref, tgt = _sigmas()
    a = plots.sigma_scatter(ref, tgt, top_k=5)
    _check(a)
    ref0, tgt0 = ref.copy(), tgt.copy()
    ref0[:5] = 0.0
    tgt0[5:10] = np.nan
    b = plots.sigma_scatter(torch.from_numpy(ref0), torch.from_numpy(tgt0), top_k=10)
    _check(b)
    assert not np.array_equal(a, b)
    _check(plots.sigma_scatter(np.zeros(4), np.zeros(4)))
    assert np.array_equal(ref0[:5], np.zeros(5))  # inputs not mutated


def test_sigma_scatter_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        plots.sigma_scatter(np.ones(3), np.ones(4))


def test_top_outlier_bars():
    ref, tgt = _sigmas()
    _check(plots.top_outlier_bars(tgt / ref, n=10))
    _check(plots.top_outlier_bars(np.array([1.0, 2.0, 0.5]), n=10))  # n > D
    _check(plots.top_outlier_bars(np.array([0.0, np.nan, -1.0])))


def test_class_counts():
    counts = {"outlier high": (0, 12), "outlier low": (1, 5), "dead": (0, 0), "hyperactive": (14, 30)}
    a = plots.class_counts(counts)
    _check(a)
    b = plots.class_counts({**counts, "dead": (0, 9)})
    assert not np.array_equal(a, b)
    _check(plots.class_counts({"a": (0, 0)}))
    _check(plots.class_counts({}))
    with pytest.raises(ValueError, match="expected 2 counts"):
        plots.class_counts({"a": (1, 2, 3)})


def test_class_counts_ylabel_names_what_is_counted(monkeypatch):
    import matplotlib.axes

    seen = []
    original = matplotlib.axes.Axes.set_ylabel

    def spy(self, label, *args, **kwargs):
        seen.append(label)
        return original(self, label, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", spy)
    counts = {"sink": (4, 4), "template": (20, 20), "content": (51, 51)}
    dims = plots.class_counts(counts)
    tokens = plots.class_counts(counts, ylabel="tokens")
    assert seen == ["dims", "tokens"]
    assert not np.array_equal(dims, tokens)


def test_layer_heatmap_wide_and_narrow():
    rng = np.random.default_rng(1)
    std = np.abs(rng.normal(1.0, 0.5, (37, 2560)))
    std[:, 4] = 2752.0
    std[2, 10] = np.nan
    std[3, 11] = -1.0
    img = plots.layer_heatmap(std, [f"{i}" for i in range(37)])
    _check(img)
    small = plots.layer_heatmap(torch.rand(3, 20), ["-1", "-2", "-6"], highlight_dims=(4, 100))
    _check(small)
    _check(plots.layer_heatmap(np.zeros((2, 5)), None))
    with pytest.raises(ValueError, match="expected 3 labels"):
        plots.layer_heatmap(np.ones((3, 4)), ["a"])


def test_layer_heatmap_pooling_keeps_a_massive_dim_visible():
    # one huge dim among many: the pooled heatmap differs from the flat one
    flat = np.ones((4, 2560))
    spiky = flat.copy()
    spiky[:, 1200] = 3000.0
    a = plots.layer_heatmap(flat, list("abcd"), highlight_dims=())
    b = plots.layer_heatmap(spiky, list("abcd"), highlight_dims=())
    # count bright (yellow-ish: high R and G, low B) pixels
    yellow = lambda im: ((im[..., 0] > 200) & (im[..., 1] > 200) & (im[..., 2] < 100)).sum()
    assert yellow(b) > yellow(a) + 4 * 20  # a column at least ~1 px wide over the image height



def test_tau_validation():
    with pytest.raises(ValueError, match="tau"):
        plots.ratio_histogram(np.zeros(3), tau=1.0)


def test_to_image_batch_pads_with_white():
    a = np.zeros((4, 6, 3), dtype=np.uint8)
    b = np.full((5, 3, 3), 0.5, dtype=np.float32)
    batch = plots.to_image_batch([a, b])
    assert batch.dtype == torch.float32 and tuple(batch.shape) == (2, 5, 6, 3)
    assert torch.all(batch[0, :4, :6] == 0) and torch.all(batch[0, 4:] == 1)
    assert torch.all(batch[1, :, :3] == 0.5) and torch.all(batch[1, :, 3:] == 1)
    img = plots.ratio_histogram(np.linspace(-1, 1, 50))
    one = plots.to_image_batch([img])
    assert torch.allclose(one[0] * 255, torch.from_numpy(img).float(), atol=1e-3)
    with pytest.raises(ValueError):
        plots.to_image_batch([])
    with pytest.raises(ValueError, match=r"arrays\[0\]"):
        plots.to_image_batch([np.zeros((3, 3))])


def test_no_pyplot_global_state():
    import sys

    plots.ratio_histogram(np.linspace(-1, 1, 10))
    if "matplotlib.pyplot" in sys.modules:  # another test may import it; then no figure may be left open
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
