import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mpqc.passes.fold_batchnorm import FoldBatchNormPass


def _conv_bn_model(with_bias: bool, bn_is_output: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w")]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"))
        conv_inputs.append("b")
    for name, values in {
        "gamma": rng.uniform(0.5, 1.5, 8), "beta": rng.standard_normal(8),
        "mean": rng.standard_normal(8), "var": rng.uniform(0.2, 2.0, 8),
    }.items():
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3, name="bn"),
    ]
    output = "bn"
    if not bn_is_output:
        nodes.append(helper.make_node("Relu", ["bn"], ["y"], name="relu"))
        output = "y"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2, 4 * 2, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_folding_removes_batchnorm_and_keeps_outputs():
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    for with_bias in (False, True):
        for bn_is_output in (False, True):
            original = _conv_bn_model(with_bias, bn_is_output)
            result = FoldBatchNormPass()(ir.from_proto(original))
            folded = ir.to_proto(result.model)
            assert result.modified
            assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
            assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
            np.testing.assert_allclose(_run(folded, x), _run(original, x), rtol=1e-5, atol=1e-5)


def test_batchnorm_after_a_shared_conv_output_is_left_alone():
    model = _conv_bn_model(with_bias=True, bn_is_output=False)
    # A second reader of the conv output: folding would change what that reader sees.
    model.graph.node.append(helper.make_node("Relu", ["c"], ["c2"], name="other"))
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    result = FoldBatchNormPass()(ir.from_proto(model))
    assert not result.modified
