"""The Int4Conv rewrite and the TensorRT INT4 conv plugin's pure-Python parts.

The rewrite must compute exactly what it replaces: each Int4Conv node, evaluated by the kernels'
torch reference on the INT8 tensor ONNX Runtime's QuantizeLinear produced, must match ONNX
Runtime's DequantizeLinear + Conv output of the original model. The plugin registration itself
needs TensorRT and a GPU and is skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mpqc_kernels.int4_layout import packed_length
from mpqc_kernels.trt_int4_conv_plugin import (
    ATTRIBUTES,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    Int4ConvSpec,
    conv_output_size,
    device_copy,
    output_shape,
    run_int4_conv,
)
from onnx import TensorProto, helper, numpy_helper

from mpqc.backends.tensorrt.int4_conv_plugin_graph import (
    int4_conv_arguments,
    int4_conv_nodes,
    is_int4_conv,
    rewrite_int4_convs,
)
from mpqc.backends.tensorrt.rules import check_tensorrt_conformance
from mpqc.errors import MpqcError

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]'): the INT4 conv reference lives in the Triton kernel module")
from mpqc_kernels.int4_conv import reference_int4_conv2d  # noqa: E402

# The w4a8 convs of the lowered_mnist fixture's policy (tests/backends/conftest.py).
W4A8_CONVS = ["block1.conv1", "block1.shortcut.conv", "block2.conv2", "block3.conv1"]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by conftest.py before triton loads


def _ort_with_outputs(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict[str, np.ndarray]:
    """Run `model` in ONNX Runtime (CPU) and return the named intermediate tensors too."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names if name not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ops as written, unfused
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = list(dict.fromkeys(names))
    return dict(zip(wanted, session.run(wanted, feeds)))


def _evaluate_rewritten(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: dict) -> list[tuple[str, float, float]]:
    """(node, max abs error, max |output|) of every Int4Conv, each evaluated by the torch reference
    on the INT8 tensor ORT computed, against ORT's output of the node it replaced."""
    nodes = [node for node in rewritten.graph.node if is_int4_conv(node)]
    tensors = _ort_with_outputs(original, [n.input[0] for n in nodes] + [n.output[0] for n in nodes], feeds)
    results = []
    for node in nodes:
        spec, packed, scale, bias = int4_conv_arguments(node)
        x = torch.from_numpy(tensors[node.input[0]])
        assert x.dtype == torch.int8
        y = run_int4_conv(x, torch.from_numpy(packed), torch.from_numpy(scale), torch.from_numpy(bias), spec,
                          conv=reference_int4_conv2d).numpy()
        expected = tensors[node.output[0]]
        assert y.shape == expected.shape and y.dtype == expected.dtype
        y, expected = y.astype(np.float64), expected.astype(np.float64)
        results.append((node.name, float(np.abs(y - expected).max()), float(np.abs(expected).max())))
    return results


def test_every_w4a8_conv_of_a_lowered_model_becomes_one_int4conv_node(lowered_mnist):
    model_bytes, policy, _, _ = lowered_mnist
    original = onnx.ModelProto.FromString(model_bytes)
    assert check_tensorrt_conformance(original, int4_conv_plugin=True) == []
    rewritten, names = rewrite_int4_convs(original)
    onnx.checker.check_model(rewritten)
    assert names == W4A8_CONVS == int4_conv_nodes(rewritten)
    assert W4A8_CONVS == [name for name, p in policy.assignments if p == "w4a8"]
    nodes = {node.name: node for node in rewritten.graph.node}
    producers = {out: node for node in rewritten.graph.node for out in node.output}
    original_outputs = {node.name: node.output[0] for node in original.graph.node}
    for name in W4A8_CONVS:
        node = nodes[name]
        assert (node.op_type, node.domain) == (PLUGIN_NAME, PLUGIN_NAMESPACE)
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert set(attributes) == {"plugin_namespace", *ATTRIBUTES}
        assert producers[node.input[0]].op_type == "QuantizeLinear"  # the INT8 tensor itself, no DQ
        assert node.output[0] == original_outputs[name]  # downstream untouched
        assert f"{name}.weight.q" not in {init.name for init in rewritten.graph.initializer}
    # INT8, float and INT4 weight-only layers are left to TensorRT.
    for name, precision in policy.assignments:
        if precision != "w4a8":
            assert nodes[name].op_type == ("MatMul" if name == "fc" else "Conv")
    assert {(o.domain, o.version) for o in rewritten.opset_import} >= {("", 21), (PLUGIN_NAMESPACE, 1)}
    # Nothing is left that TensorRT would reject: no INT4 weight reaches a Conv.
    assert not any(n.op_type == "Conv" and n.input[1].endswith(".weight.dequantized") and
                   policy.as_dict[n.name] == "w4a8" for n in rewritten.graph.node)


@pytest.mark.parametrize("fixture, tolerance", [("lowered_mnist_float32", 1e-5), ("lowered_mnist", 2e-3)])
def test_rewritten_nodes_compute_what_onnx_runtime_computes_for_the_original(fixture, tolerance, request):
    """FLOAT models match to float32 rounding. In a FLOAT16 model ONNX Runtime rounds the dequantized
    inputs and weights to FLOAT16 before its conv, while the plugin sums the integers exactly and
    rounds once: a few FLOAT16 ulps (2^-11 relative each) apart."""
    model_bytes, _, _, images = request.getfixturevalue(fixture)
    original = onnx.ModelProto.FromString(model_bytes)
    rewritten, _ = rewrite_int4_convs(original)
    results = _evaluate_rewritten(original, rewritten, {"image": images})
    assert [name for name, *_ in results] == W4A8_CONVS
    for name, error, magnitude in results:
        assert error <= tolerance * max(1.0, magnitude), (name, error, magnitude)


def _conv_model(x_shape, weight_shape, *, group=1, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                auto_pad=None, bias=True, scalar_weight_scale=False, seed=0) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv <- DQ(INT4 weight), as mpqc lowers a w4a8 conv."""
    rng = np.random.default_rng(seed)
    out_channels = weight_shape[0]
    q = rng.integers(-7, 8, weight_shape).astype(ml_dtypes.int4)
    scale = np.float32(0.02) if scalar_weight_scale else (rng.random(out_channels) * 0.05 + 0.01).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x.scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x.zero"),
        helper.make_tensor("w.q", TensorProto.INT4, weight_shape, q.astype(np.int8).reshape(-1).tolist()),
        numpy_helper.from_array(np.asarray(scale), "w.scale"),
    ]
    conv_inputs = ["x.dq", "w.dq"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "conv.bias"))
        conv_inputs.append("conv.bias")
    attrs = {"group": group, "strides": list(strides), "dilations": list(dilations), "kernel_shape": list(weight_shape[2:])}
    attrs |= {"auto_pad": auto_pad} if auto_pad else {"pads": list(pads)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zero"], ["x.q"], name="conv.input.q"),
        helper.make_node("DequantizeLinear", ["x.q", "x.scale", "x.zero"], ["x.dq"], name="conv.input.dq0"),
        helper.make_node("DequantizeLinear", ["w.q", "w.scale"], ["w.dq"], name="conv.weight.dq",
                         **({} if scalar_weight_scale else {"axis": 0})),
        helper.make_node("Conv", conv_inputs, ["y"], name="conv", **attrs),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


CASES = {
    "strided asymmetric pads": dict(x_shape=[2, 4, 9, 7], weight_shape=(6, 4, 3, 3), strides=(2, 1), pads=(1, 0, 2, 1)),
    "groups, dilation, no bias": dict(x_shape=[1, 6, 10, 10], weight_shape=(4, 3, 3, 2), group=2, dilations=(2, 1), bias=False),
    "depthwise": dict(x_shape=[1, 5, 8, 8], weight_shape=(5, 1, 3, 3), group=5, pads=(1, 1, 1, 1)),
    "same_upper stride 2": dict(x_shape=[1, 3, 9, 8], weight_shape=(8, 3, 3, 3), strides=(2, 2), auto_pad="SAME_UPPER"),
    "same_lower": dict(x_shape=[1, 3, 6, 6], weight_shape=(4, 3, 2, 2), auto_pad="SAME_LOWER"),
    "valid, per-tensor weight scale": dict(x_shape=[1, 2, 5, 5], weight_shape=(3, 2, 3, 3), auto_pad="VALID", scalar_weight_scale=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_rewrite_is_exact_for_any_conv_geometry(case):
    kwargs = CASES[case]
    original = _conv_model(**kwargs)
    rewritten, names = rewrite_int4_convs(original)
    assert names == ["conv"] and [n.op_type for n in rewritten.graph.node] == ["QuantizeLinear", PLUGIN_NAME]
    x = np.random.default_rng(1).standard_normal(kwargs["x_shape"]).astype(np.float32) * 3  # some values saturate
    [(_, error, magnitude)] = _evaluate_rewritten(original, rewritten, {"x": x})
    assert error <= 1e-5 * max(1.0, magnitude), (case, error, magnitude)


def test_a_model_without_int4_convs_comes_back_unchanged():
    original = _conv_model([1, 2, 5, 5], (3, 2, 3, 3))
    for node in original.graph.node:
        if node.name == "conv.weight.dq":
            node.input[0] = "w8.q"
    original.graph.initializer.append(numpy_helper.from_array(np.ones((3, 2, 3, 3), np.int8), "w8.q"))
    assert rewrite_int4_convs(original) == (original, [])


def test_the_rewrite_refuses_what_the_plugin_cannot_run():
    float_input = _conv_model([1, 2, 5, 5], (3, 2, 3, 3))
    conv = next(n for n in float_input.graph.node if n.op_type == "Conv")
    conv.input[0] = "x"  # the activation is not quantized: not a w4a8 conv
    with pytest.raises(MpqcError, match=r"Conv 'conv': w4a8 needs an INT8-quantized input"):
        rewrite_int4_convs(float_input)

    blocked = _conv_model([1, 2, 5, 5], (3, 2, 3, 3))
    dq = next(n for n in blocked.graph.node if n.name == "conv.weight.dq")
    dq.attribute.append(helper.make_attribute("block_size", 2))
    with pytest.raises(MpqcError, match="per-output-channel INT4 scales"):
        rewrite_int4_convs(blocked)


# --- the plugin's pure-Python pieces -------------------------------------------------------------


def _spec(**overrides) -> Int4ConvSpec:
    values = dict(weight_shape=np.array([8, 2, 3, 3], np.int32), strides=np.array([2, 1], np.int32),
                  pads=np.array([1, 0, 1, 2], np.int32), dilations=np.array([1, 2], np.int32), group=2, x_scale=0.1)
    return Int4ConvSpec.from_attributes(**(values | overrides))


def test_attributes_parse_from_plugin_fields_and_are_checked():
    spec = _spec()
    assert spec == Int4ConvSpec((8, 2, 3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 2, pytest.approx(0.1))
    assert (spec.in_channels, spec.out_channels, spec.reduction) == (4, 8, 18)
    # TensorRT hands scalars over as one-element arrays; they parse the same.
    assert _spec(group=np.array([2], np.int64), x_scale=np.array([0.1], np.float64)) == spec
    for bad, message in [
        (dict(weight_shape=np.array([8, 2, 3], np.int32)), "weight_shape needs 4 values"),
        (dict(strides=np.array([0, 1], np.int32)), "positive"),
        (dict(pads=np.array([-1, 0, 0, 0], np.int32)), "pads >= 0"),
        (dict(group=3), "group 3 does not divide"),
        (dict(x_scale=0.0), "x_scale must be a positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            _spec(**bad)
    spec.check_weights(np.zeros(8 * packed_length(18), np.int8), np.zeros(8, np.float32), np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="packed_weight holds 80 values"):
        spec.check_weights(np.zeros(80, np.int8), np.zeros(8, np.float32), np.zeros(8, np.float32))


class _LeftOnly:
    """Stands in for tensorrt.plugin.ShapeExpr: +, -, * and // with an int on the right, nothing else."""

    def __init__(self, value):
        self.value = value

    def __add__(self, other):
        assert isinstance(other, int) and other >= 0
        return _LeftOnly(self.value + other)

    def __sub__(self, other):
        assert isinstance(other, int) and other >= 0
        return _LeftOnly(self.value - other)

    def __floordiv__(self, other):
        assert isinstance(other, int) and other > 0
        return _LeftOnly(self.value // other)


@pytest.mark.parametrize("height,width", [(9, 7), (1, 5), (16, 16)])
def test_output_shape_matches_torch_and_uses_only_shape_expression_arithmetic(height, width):
    spec = _spec()
    if conv_output_size(height, 3, 2, 1, 1, 1) < 1 or conv_output_size(width, 3, 1, 0, 2, 2) < 1:
        pytest.skip("kernel does not fit")
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.zeros(3, 4, height, width), (0, 2, 1, 1)),
                                          torch.zeros(8, 2, 3, 3), stride=(2, 1), dilation=(1, 2), groups=2).shape
    assert output_shape((3, 4, height, width), spec) == tuple(expected)
    symbolic = output_shape((_LeftOnly(3), 4, _LeftOnly(height), _LeftOnly(width)), spec)
    assert (symbolic[0].value, symbolic[1], symbolic[2].value, symbolic[3].value) == tuple(expected)
    with pytest.raises(ValueError, match="4-D NCHW"):
        output_shape((3, 4, height), spec)


def test_the_plugin_computation_takes_int8_and_rejects_anything_else():
    spec = _spec(group=1, weight_shape=np.array([8, 4, 3, 3], np.int32))
    packed = torch.zeros(8 * packed_length(36), dtype=torch.int8)
    scale, bias = torch.ones(8), torch.zeros(8)
    with pytest.raises(TypeError, match="INT8 output of a QuantizeLinear"):
        run_int4_conv(torch.zeros(1, 4, 6, 6), packed, scale, bias, spec, conv=reference_int4_conv2d)
    with pytest.raises(ValueError, match="does not match weight_shape"):
        run_int4_conv(torch.zeros(1, 3, 6, 6, dtype=torch.int8), packed, scale, bias, spec, conv=reference_int4_conv2d)


def _random_plugin_case(device: str):
    original = _conv_model([2, 6, 9, 9], (8, 3, 3, 3), group=2, strides=(2, 2), pads=(1, 1, 1, 1), seed=3)
    rewritten, _ = rewrite_int4_convs(original)
    spec, packed, scale, bias = int4_conv_arguments(rewritten.graph.node[-1])
    x = torch.randint(-128, 128, (2, 6, 9, 9), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    return x.to(device), spec, packed, scale, bias


def test_the_plugin_computation_runs_the_triton_kernel_on_cpu_under_the_interpreter():
    if not INTERPRETED:
        pytest.skip("TRITON_INTERPRET is off (a GPU is present): the GPU variant below runs the compiled kernel")
    x, spec, packed, scale, bias = _random_plugin_case("cpu")
    args = (x, torch.from_numpy(packed), torch.from_numpy(scale), torch.from_numpy(bias), spec)
    torch.testing.assert_close(run_int4_conv(*args), run_int4_conv(*args, conv=reference_int4_conv2d), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_the_plugin_computation_on_the_gpu_with_cached_device_weights():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the plugin's kernel call was checked under Triton's CPU interpreter")
    x, spec, packed, scale, bias = _random_plugin_case("cuda")
    device = x.device
    weights = [device_copy(array, device) for array in (packed, scale, bias)]
    assert device_copy(packed, device) is weights[0]  # uploaded once per attribute array
    expected = run_int4_conv(x.cpu(), *(torch.from_numpy(a) for a in (packed, scale, bias)), spec, conv=reference_int4_conv2d)
    torch.testing.assert_close(run_int4_conv(x, *weights, spec).cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_the_plugin_registers_and_runs_in_a_tensorrt_engine(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: the plugin registers only on a GPU machine with mpqc[tensorrt]")
    from mpqc.backends.tensorrt.engine import TensorRTRunner, build_engine
    from mpqc.targets import load_target

    original = _conv_model([2, 6, 9, 9], (8, 3, 3, 3), group=2, strides=(2, 2), pads=(1, 1, 1, 1), seed=3)
    rewritten, _ = rewrite_int4_convs(original)
    engine = build_engine(rewritten.SerializeToString(), load_target("trt-orin"), timing_cache_path=tmp_path / "cache")
    x = np.random.default_rng(1).standard_normal((2, 6, 9, 9)).astype(np.float32) * 3
    expected = _ort_with_outputs(original, ["y"], {"x": x})["y"]
    with TensorRTRunner(engine) as runner:
        [y] = runner.run({"x": x})
        assert "PluginV3" in " ".join(layer.layer_type for layer in runner.layer_precisions().values())
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
