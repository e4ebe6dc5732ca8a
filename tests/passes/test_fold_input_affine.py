"""Constant scales and shifts a Conv reads fold into it, and the model computes the same values."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.passes.fold_input_affine import FoldConvInputAffinePass

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)


def _affine_then_conv(steps, pads, group=1, extra_outputs=()):
    """x -> Relu -> each (op, constant, constant_first) of `steps` -> Conv(4 -> 8, 3x3, `pads`) -> y."""
    inits = [numpy_helper.from_array(RNG.standard_normal((8, 4 // group, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("Relu", ["x"], ["t0"])]
    for i, (op, constant, constant_first) in enumerate(steps):
        inits.append(numpy_helper.from_array(np.asarray(constant, dtype=np.float32), f"c{i}"))
        operands = [f"c{i}", f"t{i}"] if constant_first else [f"t{i}", f"c{i}"]
        nodes.append(helper.make_node(op, operands, [f"t{i + 1}"]))
    nodes.append(helper.make_node("Conv", [f"t{len(steps)}", "w", "b"], ["y"], pads=pads, group=group))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", *extra_outputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fold(model):
    folded = ir.from_proto(model)
    modified = FoldConvInputAffinePass()(folded).modified
    return ir.to_proto(folded), modified


def _run(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


CHANNEL = RNG.uniform(0.5, 2.0, (1, 4, 1, 1))
SCALE_AND_SHIFT = [("Mul", [0.47], True), ("Add", CHANNEL, False), ("Div", 2.0, False), ("Sub", -0.3, False)]


@pytest.mark.parametrize("group", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
def test_an_unpadded_conv_takes_the_whole_affine(group):
    model = _affine_then_conv(SCALE_AND_SHIFT, pads=[0, 0, 0, 0], group=group)
    folded, modified = _fold(model)
    assert modified and [node.op_type for node in folded.graph.node] == ["Relu", "Conv"]
    np.testing.assert_allclose(_run(folded), _run(model), rtol=1e-4, atol=1e-4)


def test_a_padded_conv_takes_the_scale_and_one_add_of_the_shift_is_left():
    model = _affine_then_conv(SCALE_AND_SHIFT, pads=[1, 1, 1, 1])
    folded, modified = _fold(model)
    assert modified and [node.op_type for node in folded.graph.node] == ["Relu", "Add", "Conv"]
    np.testing.assert_allclose(_run(folded), _run(model), rtol=1e-4, atol=1e-4)


def test_a_padded_conv_takes_a_pure_scale_whole():
    model = _affine_then_conv([("Mul", CHANNEL, False), ("Div", 3.0, False)], pads=[1, 1, 1, 1])
    folded, modified = _fold(model)
    assert modified and [node.op_type for node in folded.graph.node] == ["Relu", "Conv"]
    np.testing.assert_allclose(_run(folded), _run(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["read-elsewhere", "lone-shift-padded", "constant-minus-x", "zero-scale-padded"])
def test_what_cannot_fold_exactly_stays(case):
    steps, pads, extra = SCALE_AND_SHIFT[:2], [0, 0, 0, 0], ()
    if case == "read-elsewhere":
        extra = ("t1",)
    elif case == "lone-shift-padded":
        steps, pads = [("Add", 0.5, False)], [1, 1, 1, 1]
    elif case == "constant-minus-x":
        steps = [("Sub", 1.0, True)]
    else:
        steps, pads = [("Mul", 0.0, False), ("Add", 1.0, False)], [1, 1, 1, 1]
    model = _affine_then_conv(steps, pads=pads, extra_outputs=extra)
    folded, modified = _fold(model)
    if case == "read-elsewhere":  # the Add after the read value still folds; the Mul computing it stays
        assert modified and [node.op_type for node in folded.graph.node] == ["Relu", "Mul", "Conv"]
    else:
        assert not modified and len(folded.graph.node) == len(model.graph.node)
    np.testing.assert_allclose(_run(folded), _run(model), rtol=1e-4, atol=1e-4)


def test_a_fold_that_would_overflow_float32_leaves_the_model_as_it_was():
    model = _affine_then_conv([("Mul", 3e38, False)], pads=[0, 0, 0, 0])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((8, 4, 3, 3), 2.0, np.float32), "w"))
    folded, modified = _fold(model)
    assert not modified and [node.op_type for node in folded.graph.node] == ["Relu", "Mul", "Conv"]
