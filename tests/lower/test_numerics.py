"""Quantize/dequantize numerics against independent references: a scalar loop and ONNX's own reference evaluator."""

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from mpqc.lower import numerics

finite = st.floats(-100, 100, allow_nan=False, width=32)


def _loop_reference(weight: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One channel at a time, in plain Python: the textbook symmetric quantizer."""
    limit = 2 ** (bits - 1) - 1
    moved = np.moveaxis(weight, axis, 0)
    q = np.empty(moved.shape, dtype=np.int64)
    scales = np.empty(moved.shape[0], dtype=np.float32)
    for c in range(moved.shape[0]):
        amax = float(np.abs(moved[c]).max())
        scale = np.float32(amax / limit) if amax > numerics.MIN_AMAX else np.float32(1.0 / limit)
        scales[c] = scale
        for index, value in np.ndenumerate(moved[c]):
            q[(c, *index)] = min(max(int(np.rint(value / scale)), -limit), limit)
    return np.moveaxis(q, 0, axis), scales


@settings(max_examples=60, deadline=None)
@given(
    weight=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3)), elements=finite),
    bits=st.sampled_from([4, 8]),
    axis=st.integers(0, 2),
)
def test_per_channel_matches_loop_reference(weight, bits, axis):
    q, scales = numerics.quantize_weight(weight, bits, axis)
    ref_q, ref_scales = _loop_reference(weight, bits, axis)
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
    np.testing.assert_array_equal(q, ref_q)
    assert np.abs(q).max(initial=0) <= 2 ** (bits - 1) - 1


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 200), n=st.integers(1, 6), block=st.sampled_from([16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_blockwise_dequantize_matches_onnx_reference(k, n, block, seed):
    """Our block-wise INT4 layout, dequantized by ONNX's reference DequantizeLinear, reproduces our own expansion."""
    weight = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    q, scales = numerics.quantize_weight(weight, 4, channel_axis=1, block_axis=0, block_size=block)
    assert scales.shape == (-(-k // block), n)
    ours = q.astype(np.float32) * numerics.expand_scales(scales, weight.shape, 0, block)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0, block_size=block)
    graph = helper.make_graph(
        [node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(q.astype(ml_dtypes.int4), "q"),
         numpy_helper.from_array(scales, "s"),
         numpy_helper.from_array(np.zeros(scales.shape, dtype=ml_dtypes.int4), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    theirs = ReferenceEvaluator(model).run(None, {})[0]
    np.testing.assert_array_equal(ours, theirs)
    # Each block's error is at most half a step of that block.
    assert np.all(np.abs(ours - weight) <= numerics.expand_scales(scales, weight.shape, 0, block) / 2 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 50), elements=finite), amax=st.floats(0.01, 50))
def test_activation_quantization_matches_onnx_quantizelinear(values, amax):
    scale = numerics.activation_scale(amax)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])]
    graph = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")],
    )
    theirs = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])).run(None, {"x": values})[0]
    expected = np.clip(np.rint(values / scale), -128, 127)
    np.testing.assert_array_equal(theirs, expected)
    assert abs(float(scale) * 127 - amax) <= amax * 1e-6
