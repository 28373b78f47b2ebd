"""HF hidden_states index <-> ComfyUI clip_layer arithmetic (the whole verified table)."""

from __future__ import annotations

import pytest

from dimfix.layers import LayerIndexError, comfy_to_hf_layer, hf_layer_range, hf_to_comfy_layer, normalize_hf_layer


@pytest.mark.parametrize("n", [3, 4, 14, 36])
def test_round_trip_every_reachable_index(n):
    for k in range(1, n):
        i = hf_to_comfy_layer(k, n)
        assert -n <= i <= -2
        assert comfy_to_hf_layer(i, n) == k
        assert hf_to_comfy_layer(k - n - 1, n) == i  # negative spelling of the same layer


def test_qwen3_4b_examples():
    # Hand-written from the verified table (N = 36): HF [-2] = clip -2, HF [31] = [-6] = clip -6, HF [1] = clip -36.
    assert hf_to_comfy_layer(-2, 36) == -2
    assert hf_to_comfy_layer(35, 36) == -2
    assert hf_to_comfy_layer(-6, 36) == -6
    assert hf_to_comfy_layer(31, 36) == -6
    assert hf_to_comfy_layer(1, 36) == -36
    assert hf_to_comfy_layer(-36, 36) == -36
    assert hf_layer_range(36) == (1, 35, -36, -2)


def test_comfy_table():
    n = 36
    assert [comfy_to_hf_layer(i, n) for i in (0, 1, 34)] == [1, 2, 35]  # 0 <= i <= N-2 -> i+1
    assert [comfy_to_hf_layer(i, n) for i in (-36, -6, -2)] == [1, 31, 35]  # -N <= i <= -2 -> [i]
    assert comfy_to_hf_layer(-1, n) is None and comfy_to_hf_layer(35, n) is None  # pre-norm last block
    assert comfy_to_hf_layer(37, n) == 35 and comfy_to_hf_layer(-40, n) == 35  # ignored -> default -2
    with pytest.raises(LayerIndexError, match="crashes"):
        comfy_to_hf_layer(36, n)


def test_unreachable_and_out_of_range():
    with pytest.raises(LayerIndexError, match="embedding.*valid: 1..13 or -14..-2"):
        hf_to_comfy_layer(0, 14)
    with pytest.raises(LayerIndexError, match="embedding"):
        hf_to_comfy_layer(-15, 14)
    for k in (14, -1):
        with pytest.raises(LayerIndexError, match="final-normed.*valid: 1..13 or -14..-2"):
            hf_to_comfy_layer(k, 14)
    for k in (15, -16, 100):
        with pytest.raises(LayerIndexError, match="out of range for a 14-layer model.*valid: 1..13 or -14..-2"):
            hf_to_comfy_layer(k, 14)


def test_normalize():
    assert normalize_hf_layer(-1, 36) == 36
    assert normalize_hf_layer(-37, 36) == 0
    assert normalize_hf_layer(0, 36) == 0
    with pytest.raises(LayerIndexError):
        normalize_hf_layer(37, 36)
    with pytest.raises(LayerIndexError, match="depth"):
        normalize_hf_layer(0, 1)


def test_plan_analysis_layers_pairs_and_selects():
    from dimfix.layers import plan_analysis_layers

    # same layer: k with k; the reference asks for one position only
    p = plan_analysis_layers(-2, -2, 37, 37)
    assert (p.labels, p.primary, p.reference_layer, p.select_reference, p.select_target) == (
        [-2], -2, None, [35], [35])
    # positive indices are normalised: 35 of 37 states == -2
    assert plan_analysis_layers(35, -2, 37, 37) == p
    # a VL target at -6 against the reference at -2
    p = plan_analysis_layers(-6, -2, 37, 37)
    assert (p.labels, p.reference_layer, p.select_reference, p.select_target) == ([-6], -2, [35], [31])
    # sweeps: same layer and depth -> both encoders at every layer
    p = plan_analysis_layers(-2, -2, 5, 5, sweep=True)
    assert (p.labels, p.primary, p.reference_layer, p.select_reference, p.select_target) == (
        [-5, -4, -3, -2, -1], -2, None, "all", "all")
    # ... a fixed reference layer, or another depth -> the reference at one layer
    p = plan_analysis_layers(-3, -2, 5, 5, sweep=True)
    assert (p.primary, p.reference_layer, p.select_reference, p.select_target) == (-3, -2, [3], "all")
    p = plan_analysis_layers(-2, -2, 7, 5, sweep=True)
    assert (p.labels, p.reference_layer, p.select_reference) == (list(range(-7, 0)), -2, [3])
    with pytest.raises(LayerIndexError, match=r"^layer 5 is out of range for 'target', which has 5 HF hidden states "
                                              r"\(valid: -5 .. 4"):
        plan_analysis_layers(5, -2, 5, 5)
    with pytest.raises(LayerIndexError, match=r"^reference_layer -6 is out of range for 'reference'"):
        plan_analysis_layers(-2, -6, 9, 5)
