"""The ort-cpu target's session options reach ONNX Runtime's optimizer: a residual Add and the
LayerNormalization after it stay two kernels (benchmarks/ort_fusions.py measures why)."""

import dataclasses

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from mpqc.backends.onnxruntime.runner import optimized_op_counts
from mpqc.targets import load_target


def _residual_layer_norm() -> bytes:
    hidden = 16
    inits = [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "beta")]
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, hidden]) for name in ("x", "skip")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_the_target_keeps_add_and_layer_norm_apart_where_onnx_runtime_would_fuse_them():
    target = load_target("ort-cpu")
    fused = dataclasses.replace(target, runtime=dataclasses.replace(target.runtime, session_config={}))
    assert optimized_op_counts(_residual_layer_norm(), fused) == {"SkipLayerNormalization": 1}
    assert optimized_op_counts(_residual_layer_norm(), target) == {"Add": 1, "LayerNormalization": 1}
