"""INT8 regions: the ops between quantized layers get Q/DQ, so ONNX Runtime chains integer kernels."""

import pathlib
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from mpqc.backends.onnxruntime.runner import numerics_target, session_options
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.policy import Policy
from mpqc.targets import load_target

REGIONNET = textwrap.dedent(
    """
    import torch

    class RegionNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.left = torch.nn.Conv2d(8, 8, 1)
            self.right = torch.nn.Conv2d(8, 8, 1)
            self.fc = torch.nn.Linear(16 * 8 * 8, 10)

        def forward(self, x):
            a = torch.relu(self.conv1(x))
            b = torch.relu(self.conv2(a)) + a                            # residual Add
            b = torch.nn.functional.max_pool2d(b, 2)                     # keeps its input's scale
            c = torch.cat([self.left(b), self.right(b)], 1) + 1.0        # Concat; an Add of a constant
            return self.fc(torch.flatten(c, 1))

    def make():
        torch.manual_seed(0)
        return RegionNet().eval(), torch.randn(1, 3, 16, 16)
    """
)


@pytest.fixture()
def regionnet(tmp_path, monkeypatch):
    (tmp_path / "regionnet.py").write_text(REGIONNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    analysis = analyze("regionnet:make")
    feeds = {"input": np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)}
    return analysis, feeds


def _lower(analysis, feeds, target="ort-cpu", **precisions):
    lowering = Lowering.prepare(analysis, load_target(target), feeds)
    assignments = tuple((layer.name, precisions.get(layer.name, "w8a8")) for layer in analysis.layers)
    return onnx.load_from_string(lowering.lower(Policy(assignments, "test")))


def _optimized_ops(model: onnx.ModelProto, tmp_path: pathlib.Path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def _node(model: onnx.ModelProto, op_type: str, index: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == op_type][index]


def test_uniform_int8_chains_through_add_concat_and_pooling(regionnet, tmp_path):
    analysis, feeds = regionnet
    model = _lower(analysis, feeds)
    ops = _optimized_ops(model, tmp_path)
    assert ops.count("QLinearConv") == 4
    assert "QLinearAdd" in ops and "QLinearConcat" in ops
    assert ops[-1] == "QGemm"
    # The Add of a constant is not a region op (its constant is not quantized): it stays a float Add.
    assert ops.count("Add") == 1
    reference = ort.InferenceSession(analysis.loaded.model.SerializeToString(), providers=["CPUExecutionProvider"])
    # Exact INT8 kernels: an AVX2 CPU's saturating u8s8 ones are the CPU's error, not the lowering's.
    built = ort.InferenceSession(model.SerializeToString(), session_options(numerics_target()), providers=["CPUExecutionProvider"])
    x = feeds["input"][:4]
    want, got = reference.run(None, {"input": x})[0], built.run(None, {"input": x})[0]
    assert 10 * np.log10((want**2).sum() / ((want - got) ** 2).sum()) > 25


def test_pass_through_ops_keep_their_input_scale(regionnet):
    analysis, feeds = regionnet
    model = _lower(analysis, feeds)
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = _producers(model)
    pool = _node(model, "MaxPool")
    before = producers[pool.input[0]]
    after = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    assert before.op_type == "DequantizeLinear"
    assert constants[before.input[1]] == constants[after.input[1]]
    assert constants[before.input[2]] == constants[after.input[2]]


def test_a_float_layer_is_a_region_boundary(regionnet):
    analysis, feeds = regionnet
    float_layer = next(layer.name for layer in analysis.layers if layer.op_type == "Conv" and "conv2" in layer.name)
    model = _lower(analysis, feeds, **{float_layer: "fp32"})
    producers = _producers(model)
    add = next(n for n in model.graph.node if n.op_type == "Add" and not any(i in {c.name for c in model.graph.initializer} for i in n.input))
    # The residual Add reads the float conv through its ReLU: it stays out of the region (a float op
    # with no quantizer after it), and so does the MaxPool after it.
    assert sorted(producers[i].op_type for i in add.input) == ["DequantizeLinear", "Relu"]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == add.output[0] for n in model.graph.node)
    pool = _node(model, "MaxPool")
    assert producers[pool.input[0]].op_type == "Add"
    # Nothing the float layer reads is quantized (ONNX Runtime would quantize its weights itself).
    conv = next(n for n in model.graph.node if n.name == float_layer)
    assert producers[conv.input[0]].op_type != "DequantizeLinear"


def test_tensorrt_targets_keep_their_placement(regionnet):
    analysis, feeds = regionnet
    model = _lower(analysis, feeds, target="trt-a100")
    producers = _producers(model)
    for op in ("MaxPool", "Concat"):
        node = _node(model, op)
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
