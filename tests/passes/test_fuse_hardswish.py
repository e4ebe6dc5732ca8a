"""Exported hard-swish forms become one HardSwish op, and the model computes the same values."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.passes.fuse_hardswish import FuseHardSwishPass

X = np.linspace(-8, 8, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)


def _constant(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(nodes, opset=17, outputs=("y",)):
    inits = [_constant("three", 3.0), _constant("zero", 0.0), _constant("six", 6.0), _constant("sixth", 1 / 6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _relu6(shifted="s"):
    return [helper.make_node("Add", ["x", "three"], [shifted]), helper.make_node("Clip", [shifted, "zero", "six"], ["c"])]


FORMS = {
    "x*clip/6": _relu6() + [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])],
    "x*clip*(1/6)": _relu6() + [helper.make_node("Mul", ["c", "x"], ["m"]), helper.make_node("Mul", ["sixth", "m"], ["y"])],
    "x*(clip/6)": _relu6() + [helper.make_node("Div", ["c", "six"], ["g"]), helper.make_node("Mul", ["x", "g"], ["y"])],
    "x*hardsigmoid": [helper.make_node("HardSigmoid", ["x"], ["g"], alpha=1 / 6, beta=0.5),
                      helper.make_node("Mul", ["g", "x"], ["y"])],
}


def _run(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})


def _fuse(model):
    fused = ir.from_proto(model)
    modified = FuseHardSwishPass()(fused).modified
    return ir.to_proto(fused), modified


@pytest.mark.parametrize("form", FORMS)
def test_every_exported_form_becomes_one_hard_swish_with_the_same_values(form):
    model = _model(FORMS[form])
    fused, modified = _fuse(model)
    assert modified
    assert [node.op_type for node in fused.graph.node] == ["HardSwish"]
    assert fused.graph.output[0].name == "y"  # readers and users fetch it by the same name
    np.testing.assert_allclose(_run(fused)[0], _run(model)[0], rtol=1e-6, atol=1e-6)


def test_an_intermediate_that_is_read_elsewhere_keeps_the_pattern():
    model = _model(FORMS["x*clip/6"], outputs=("y", "c"))
    fused, modified = _fuse(model)
    assert not modified and len(fused.graph.node) == 4


@pytest.mark.parametrize("change", ["shift", "clip", "divisor", "opset"])
def test_what_is_not_hard_swish_stays(change):
    nodes = [helper.make_node("Add", ["x", "six" if change == "shift" else "three"], ["s"]),
             helper.make_node("Clip", ["s", "zero", "three" if change == "clip" else "six"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["m"]),
             helper.make_node("Div", ["m", "three" if change == "divisor" else "six"], ["y"])]
    model = _model(nodes, opset=13 if change == "opset" else 17)  # HardSwish exists from opset 14
    fused, modified = _fuse(model)
    assert not modified and len(fused.graph.node) == 4
