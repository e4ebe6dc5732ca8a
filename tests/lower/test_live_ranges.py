"""Live ranges: a tensor's calibrated range is cut only where no reader can tell the values apart."""

import math
import textwrap

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from mpqc.lower.live_ranges import UNBOUNDED, clamp_range, live_bounds
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.policy import Policy
from mpqc.targets import load_target


def _scalar(name, value):
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _model(nodes, initializers, output="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _affine_hard_swish(a, b):
    """y = hardswish(x * a + b), with hard-swish as exporters write it: t * Clip(t + 3, 0, 6) / 6."""
    nodes = [helper.make_node("Mul", ["x", "a"], ["s"]), helper.make_node("Add", ["s", "b"], ["t"]),
             helper.make_node("Add", ["t", "three"], ["u"]), helper.make_node("Clip", ["u", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["t", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]
    inits = [_scalar("a", a), _scalar("b", b), _scalar("three", 3.0), _scalar("zero", 0.0), _scalar("six", 6.0)]
    return _model(nodes, inits)


def _bounds(model, name="x"):
    graph = ir.from_proto(model).graph
    values = {v.name: v for node in graph for v in node.outputs} | {v.name: v for v in graph.inputs}
    return live_bounds(values[name])


def test_affine_then_exported_hard_swish_bounds_below_at_minus_three_pulled_back():
    low, high = _bounds(_affine_hard_swish(1.9, 0.8))
    assert low == pytest.approx((-3.0 - 0.8) / 1.9) and high == math.inf


def test_a_decreasing_affine_step_gives_no_bounds():
    assert _bounds(_affine_hard_swish(-1.9, 0.8)) == UNBOUNDED


def test_a_chain_of_constants_that_overflows_claims_nothing():
    nodes = [helper.make_node("Mul", ["x" if i == 0 else f"m{i}", "huge"], [f"m{i + 1}"]) for i in range(9)]
    model = _model(nodes + [helper.make_node("Relu", ["m9"], ["y"])], [_scalar("huge", 3e38)])
    assert _bounds(model) == UNBOUNDED


def test_a_second_reader_outside_the_chain_gives_no_bounds():
    model = _affine_hard_swish(1.0, 0.0)
    model.graph.node.append(helper.make_node("Neg", ["x"], ["n"]))
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, None))
    assert _bounds(model) == UNBOUNDED


def test_hard_sigmoid_bounds_both_sides():
    model = _model([helper.make_node("Sub", ["x", "c"], ["s"]), helper.make_node("HardSigmoid", ["s"], ["y"], alpha=0.25, beta=0.5)],
                   [_scalar("c", 1.0)])
    assert _bounds(model) == pytest.approx((1.0 - 2.0, 1.0 + 2.0))


def test_a_clip_bound_computed_at_run_time_is_not_used():
    model = _model([helper.make_node("Clip", ["x", "zero", "limit"], ["y"])], [_scalar("zero", 0.0)])
    model.graph.input.append(helper.make_tensor_value_info("limit", TensorProto.FLOAT, []))
    assert _bounds(model) == (0.0, math.inf)  # the constant lower bound holds; the fed upper one is unknown


def test_a_clip_with_one_constant_bound_bounds_that_side():
    model = _model([helper.make_node("Div", ["x", "two"], ["h"]), helper.make_node("Clip", ["h", "", "six"], ["y"])],
                   [_scalar("two", 2.0), _scalar("six", 6.0)])
    assert _bounds(model) == (-math.inf, 12.0)


def test_clamp_range_keeps_the_calibrated_range_when_the_cut_leaves_nothing():
    assert clamp_range(-5.0, 4.0, (-2.0, math.inf)) == (-2.0, 4.0)
    assert clamp_range(-5.0, -4.0, (-2.0, math.inf)) == (-5.0, -4.0)


@settings(max_examples=25, deadline=None)
@given(a=st.floats(0.05, 20.0), b=st.floats(-10.0, 10.0))
def test_clamping_to_the_live_bounds_leaves_the_float_outputs_unchanged(a, b):
    model = _affine_hard_swish(a, b)
    low, high = _bounds(model)
    x = np.linspace(-60.0, 60.0, 64, dtype=np.float32)[None]
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    clamped = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.clip(x, low, high).astype(np.float32)})[0]
    np.testing.assert_allclose(clamped, plain, rtol=0, atol=1e-5)


AFFINENET = textwrap.dedent(
    """
    import torch

    class AffineNet(torch.nn.Module):
        '''conv -> x * a + b -> hard-swish written out -> conv, as PP-LCNetV3's blocks export.'''

        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 1)
            with torch.no_grad():
                self.conv1.bias[:4] -= 30.0  # far into hard-swish's dead zone, as trained nets have

        def forward(self, x):
            t = self.conv1(x) * 1.9 + 0.8
            return self.conv2(t * torch.clamp(t + 3.0, 0.0, 6.0) / 6.0)

    def make():
        torch.manual_seed(0)
        return AffineNet().eval(), torch.randn(1, 3, 8, 8)
    """
)


def test_lowering_cuts_the_conv_output_range_and_is_closer_to_float(tmp_path, monkeypatch):
    (tmp_path / "affinenet.py").write_text(AFFINENET)
    monkeypatch.syspath_prepend(str(tmp_path))
    analysis = analyze("affinenet:make")
    feeds = {"input": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    lowering = Lowering.prepare(analysis, load_target("ort-cpu"), feeds)
    conv1 = next(layer for layer in analysis.layers if layer.name.endswith("conv1"))
    output = next(node.outputs[0].name for node in analysis.model.graph if node.name == conv1.name)
    assert output in lowering.narrowed
    low, high = lowering.ranges[output]
    assert low == pytest.approx(-3.0)  # x * 1.9 + 0.8 folded into conv1: hard-swish reads its output

    policy = Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "test")
    uncut = Lowering(analysis, lowering.target, lowering.float_model,
                     {**lowering.ranges, output: (feeds_low := _calibrated_low(lowering, output, feeds), high)},
                     lowering.input_means)
    assert feeds_low < low
    reference = _run(lowering.float_model.SerializeToString(), feeds)
    error_cut = np.abs(_run(lowering.lower(policy), feeds) - reference).mean()
    error_uncut = np.abs(_run(uncut.lower(policy), feeds) - reference).mean()
    assert error_cut < error_uncut


def _calibrated_low(lowering, name, feeds):
    from mpqc.calibrate.ranges import calibrate

    return calibrate(lowering.float_model, [name], feeds)[name][0]


def _run(model_bytes, feeds):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
