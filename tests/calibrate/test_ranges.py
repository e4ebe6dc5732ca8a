"""Activation ranges from a real ONNX Runtime session over a one-node model."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from mpqc.calibrate.ranges import calibrate, least_error_range
from mpqc.errors import MpqcError
from mpqc.lower.numerics import activation_params


def _identity_model():
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "w"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _error(values: np.ndarray, low: float, high: float, grid: str = "uint8") -> float:
    """Mean squared error of the grid the lowering builds for [low, high] over `values`."""
    scale, zero = activation_params(low, high, grid)
    scale, zero = float(scale), float(zero)
    lo, hi = (0, 255) if grid == "uint8" else (-127, 127)
    q = np.clip(np.rint(values / scale) + zero, lo, hi)
    return float(np.mean(((q - zero) * scale - values) ** 2))


# Rounding error grows with the count of values and a clipped one costs its squared distance, so
# the least-error range clips a tail only when it is thin against many values (a tensor of a
# transformer's proxy batch holds millions).
@pytest.mark.parametrize("grid", ["uint8", "int8"])
def test_mse_clips_a_thin_far_tail_that_minmax_keeps(grid):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(16 * 65536)
    values[:2] = [25.0, 30.0]
    feeds = {"x": values.astype(np.float32).reshape(16, 65536)}
    minmax = calibrate(_identity_model(), ["y"], feeds, "minmax", grid=grid)["y"]
    mse = calibrate(_identity_model(), ["y"], feeds, "mse", grid=grid)["y"]
    assert mse[1] <= 0.6 * minmax[1]
    assert _error(values, *mse, grid) < 0.6 * _error(values, *minmax, grid)


def test_mse_shrinks_only_the_end_with_the_tail():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.uniform(-1, 0, 16 * 65536 - 2), [5.0, 6.0]]).astype(np.float32).reshape(16, 65536)
    minmax = calibrate(_identity_model(), ["y"], {"x": values}, "minmax")["y"]
    low, high = calibrate(_identity_model(), ["y"], {"x": values}, "mse")["y"]
    assert low == pytest.approx(minmax[0], rel=0.02) and high < 0.5 * minmax[1]


def test_mse_keeps_the_full_range_of_uniform_values():
    values = np.random.default_rng(1).uniform(-1, 3, (8, 4096)).astype(np.float32)
    low, high = calibrate(_identity_model(), ["y"], {"x": values}, "mse")["y"]
    assert (low, high) == pytest.approx((float(values.min()), float(values.max())), rel=0.02)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.05, 20), st.floats(0.5, 5), st.floats(-1, 1), st.sampled_from(["uint8", "int8"]), st.integers(0, 2**31))
def test_the_chosen_range_is_the_best_candidate_measured_on_the_values(tail, spread, shift, grid, seed):
    """Against every candidate range measured exactly on the lowering's own grid, the pick is the
    best up to what a histogram of 2048 bins can resolve, and never worse than minmax. The expected
    rounding error is step^2 / 12, true where values spread over many steps: the bulk here spans
    at least a few."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(shift, spread, 20000), rng.exponential(tail, 50)])
    low, high = float(values.min()), float(values.max())
    hist = np.histogram(values, bins=2048, range=(low, high))[0]
    chosen = least_error_range(hist, low, high, grid)
    factors = np.linspace(0.2, 1.0, 81)
    if grid == "int8":
        amax = max(-low, high)
        candidates = [(-amax * a, amax * a) for a in factors]
    else:
        candidates = [(min(low, 0) * a, max(high, 0) * b) for a in factors for b in factors]
    best = min(_error(values, *c, grid) for c in candidates)
    resolution = ((high - low) / 2048) ** 2
    picked = _error(values, *chosen, grid)
    assert picked <= best * 1.05 + resolution
    assert picked <= _error(values, low, high, grid) * 1.05 + resolution


def test_an_all_zero_tensor_keeps_its_empty_range():
    feeds = {"x": np.zeros((2, 4096), np.float32)}
    assert calibrate(_identity_model(), ["y"], feeds, "mse") == {"y": (0.0, 0.0)}


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile"])
def test_an_overflowing_tensor_comes_back_non_finite_for_the_caller_to_refuse(method):
    values = np.ones((2, 4096), np.float32)
    values[0, 0] = np.inf
    low, high = calibrate(_identity_model(), ["y"], {"x": values}, method)["y"]
    assert not np.isfinite(high)


def test_an_unknown_method_is_one_error():
    with pytest.raises(MpqcError, match="unknown calibration method 'entropy'"):
        calibrate(_identity_model(), ["y"], {"x": np.zeros((1, 4096), np.float32)}, "entropy")
