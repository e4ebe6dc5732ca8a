"""Constant scales and shifts after a Conv fold into it, and the model computes the same values."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.passes.fold_affine import FoldConvAffinePass

RNG = np.random.default_rng(0)


def _conv_then(steps, extra_outputs=()):
    """x -> Conv(4 -> 6, 3x3) -> each (op, constant, constant_first) of `steps` in turn -> y."""
    inits = [numpy_helper.from_array(RNG.standard_normal((6, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(6).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t0"], pads=[1, 1, 1, 1])]
    for i, (op, constant, constant_first) in enumerate(steps):
        inits.append(numpy_helper.from_array(np.asarray(constant, dtype=np.float32), f"c{i}"))
        operands = [f"c{i}", f"t{i}"] if constant_first else [f"t{i}", f"c{i}"]
        nodes.append(helper.make_node(op, operands, [f"t{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"t{len(steps)}"], ["y"]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", *extra_outputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fold(model):
    folded = ir.from_proto(model)
    modified = FoldConvAffinePass()(folded).modified
    return ir.to_proto(folded), modified


X = RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)


def _run(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})


def test_a_scale_and_a_per_channel_shift_fold_into_the_conv():
    channel_shift = RNG.standard_normal((1, 6, 1, 1))
    model = _conv_then([("Mul", [1.9], True), ("Add", channel_shift, False), ("Div", 4.0, False), ("Sub", -0.5, False)])
    folded, modified = _fold(model)
    assert modified
    assert [node.op_type for node in folded.graph.node] == ["Conv", "Identity"]
    np.testing.assert_allclose(_run(folded)[0], _run(model)[0], rtol=1e-5, atol=1e-5)


def test_the_conv_output_keeps_other_readers_so_nothing_folds():
    model = _conv_then([("Mul", 2.0, False)], extra_outputs=("t0",))
    folded, modified = _fold(model)
    assert not modified and [node.op_type for node in folded.graph.node] == ["Conv", "Mul", "Identity"]


@pytest.mark.parametrize("step", [("Sub", 1.0, True), ("Div", 2.0, True), ("Mul", np.ones((6, 5, 5)), False)],
                         ids=["constant-minus-x", "constant-over-x", "not-per-channel"])
def test_what_is_not_a_per_channel_affine_of_the_conv_output_stays(step):
    model = _conv_then([step])
    folded, modified = _fold(model)
    assert not modified and len(folded.graph.node) == 3


def test_a_folded_graph_output_keeps_its_name():
    model = _conv_then([("Mul", 3.0, False)])
    model.graph.node.pop()  # the Mul's output is the graph output itself
    model.graph.output[0].name = "t1"
    folded, _ = _fold(model)
    assert [node.op_type for node in folded.graph.node] == ["Conv"] and folded.graph.output[0].name == "t1"
    np.testing.assert_allclose(_run(folded)[0], _run(model)[0], rtol=1e-5, atol=1e-5)


def test_a_step_whose_fold_would_overflow_float32_stays_and_the_steps_before_it_fold():
    model = _conv_then([("Mul", 2.0, False), ("Mul", 3e38, False)])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((6, 4, 3, 3), 2.0, np.float32), "w"))
    folded, modified = _fold(model)
    assert modified and [node.op_type for node in folded.graph.node] == ["Conv", "Mul", "Identity"]
    weight = next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1])
    assert np.all(numpy_helper.to_array(weight) == 4.0)
