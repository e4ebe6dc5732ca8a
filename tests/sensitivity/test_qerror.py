"""qerror sensitivity on the bundled mnist-cnn: its layer math against ONNX Runtime, its scores against
what the real lowering's QDQ model does to each layer's output."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mpqc.calibrate.ranges import calibrate
from mpqc.data.proxy import proxy_feeds
from mpqc.lower.qdq import lower, plan_activation_quantizers
from mpqc.passes.analysis import analyze
from mpqc.pipeline.options import BuildOptions
from mpqc.policy import Policy
from mpqc.sensitivity.qerror import LayerOp, qerror_scores
from mpqc.targets import load_target

SAMPLES = 32


@pytest.fixture(scope="module")
def mnist():
    analysis = analyze("mnist-cnn")
    feeds, _ = proxy_feeds(BuildOptions(model="mnist-cnn").proxy_source(), analysis.loaded)
    feeds = {name: array[:SAMPLES] for name, array in feeds.items()}
    target = load_target("ort-cpu")
    candidates = {layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=False)] for layer in analysis.layers}
    model = ir.to_proto(analysis.model)
    return analysis, model, feeds, target, candidates


@pytest.fixture(scope="module")
def scores(mnist):
    analysis, model, feeds, target, candidates = mnist
    return qerror_scores(model, analysis.layers, candidates, feeds, target, samples=SAMPLES)


def _session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    existing = {o.name for o in extended.graph.output}
    extended.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs if name not in existing)
    options = ort.SessionOptions()
    # No fusions: the QDQ model must run DequantizeLinear + float op exactly as written.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(extended.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_scores_cover_every_candidate_and_order_by_bits(mnist, scores):
    analysis, _, _, _, candidates = mnist
    assert set(scores) == {(name, p) for name, ps in candidates.items() for p in ps}
    for layer in analysis.layers:
        assert scores[(layer.name, "fp32")] == 0.0
        quantized = {p: scores[(layer.name, p)] for p in candidates[layer.name] if p != "fp32"}
        assert all(np.isfinite(v) and v > 0 for v in quantized.values()), quantized
        assert quantized["w4a8"] > quantized["w8a8"], layer.name
    assert scores[("fc", "w4a16")] > scores[("fc", "w8a8")]


def test_torch_layer_math_matches_onnx_runtime(mnist):
    analysis, model, feeds, _, _ = mnist
    names = [n for layer in analysis.layers for n in (layer.activation, layer.output)]
    values = dict(zip(names, _session(model, names).run(names, feeds)))
    constants = {t.name: t for t in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    for layer in analysis.layers:
        op = LayerOp(nodes[layer.name], constants)
        weight = torch.from_numpy(numpy_helper.to_array(constants[layer.weight]).copy())
        ours = op(torch.from_numpy(values[layer.activation]), weight).numpy()
        theirs = values[layer.output]
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max(), err_msg=layer.name)


@pytest.mark.parametrize(
    "layer_name, precision_name, activation_type",
    [
        ("block1.conv1", "w8a8", "uint8"),  # stride 2, asymmetric UINT8 input (ORT's placement)
        ("block1.conv1", "w4a8", "int8"),  # INT4 per channel, symmetric INT8 input (TensorRT's)
        ("block3.conv2", "w8a8", "int8"),
        ("fc", "w4a16", "uint8"),  # Gemm lowered to MatMul with INT4 blocks along K
        ("fc", "w8a8", "uint8"),
    ],
)
def test_scores_match_the_lowered_qdq_model(mnist, layer_name, precision_name, activation_type):
    """Quantize one layer with the real lowering (input Q/DQ only), run it, and score its output the same way."""
    analysis, model, feeds, target, _ = mnist
    target = dataclasses.replace(target, activation_type=activation_type, quantize_layer_outputs=False)
    layer = next(layer for layer in analysis.layers if layer.name == layer_name)
    ours = qerror_scores(model, [layer], {layer_name: [precision_name]}, feeds, target, samples=SAMPLES)

    policy = Policy(tuple((item.name, precision_name if item.name == layer_name else "fp32") for item in analysis.layers))
    working = ir.from_proto(model)
    sites = plan_activation_quantizers(working, analysis.layers, policy, target)
    ranges = calibrate(model, [site.value for site in sites], feeds, "minmax")
    quantized_model = ir.to_proto(lower(working, analysis.layers, policy, target, sites, ranges))
    quantized = _session(quantized_model, [layer.output]).run([layer.output], feeds)[0]
    reference = _session(model, [layer.output]).run([layer.output], feeds)[0]
    expected = np.mean((quantized.astype(np.float64) - reference) ** 2) / np.mean(reference.astype(np.float64) ** 2)
    assert expected > 0
    assert ours[(layer_name, precision_name)] == pytest.approx(expected, rel=1e-4)


def _single_node_model(node, x_shape, weight, bias=None):
    initializers = [numpy_helper.from_array(weight, "W")] + ([numpy_helper.from_array(bias, "B")] if bias is not None else [])
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


RNG = np.random.default_rng(0)
CASES = {
    "asymmetric pads, stride 2": (helper.make_node("Conv", ["X", "W", "B"], ["Y"], strides=[2, 2], pads=[0, 0, 1, 1]), (2, 4, 9, 10), (6, 4, 3, 3), 6),
    "same upper": (helper.make_node("Conv", ["X", "W"], ["Y"], strides=[2, 2], auto_pad="SAME_UPPER"), (2, 4, 9, 10), (6, 4, 4, 3), None),
    "same lower": (helper.make_node("Conv", ["X", "W"], ["Y"], strides=[2, 1], auto_pad="SAME_LOWER"), (2, 4, 9, 10), (6, 4, 4, 3), None),
    "dilated": (helper.make_node("Conv", ["X", "W"], ["Y"], dilations=[2, 1], pads=[2, 1, 2, 1]), (2, 4, 9, 10), (6, 4, 3, 3), None),
    "valid, grouped": (helper.make_node("Conv", ["X", "W", "B"], ["Y"], group=2, auto_pad="VALID"), (2, 4, 9, 10), (6, 2, 3, 3), 6),
    "conv1d": (helper.make_node("Conv", ["X", "W", "B"], ["Y"], strides=[3], pads=[2, 1]), (2, 4, 17), (5, 4, 4), 5),
    "gemm alpha beta": (helper.make_node("Gemm", ["X", "W", "B"], ["Y"], alpha=0.5, beta=2.0), (3, 8), (8, 5), 5),
    "gemm transB": (helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1), (3, 8), (5, 8), 5),
    "matmul 3d": (helper.make_node("MatMul", ["X", "W"], ["Y"]), (2, 7, 8), (8, 5), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_op_attributes_match_onnx_runtime(case):
    node, x_shape, w_shape, bias_size = CASES[case]
    weight = RNG.standard_normal(w_shape).astype(np.float32)
    bias = RNG.standard_normal(bias_size).astype(np.float32) if bias_size else None
    model = _single_node_model(node, x_shape, weight, bias)
    x = RNG.standard_normal(x_shape).astype(np.float32)
    theirs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    constants = {t.name: t for t in model.graph.initializer}
    ours = LayerOp(node, constants)(torch.from_numpy(x), torch.from_numpy(weight)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
