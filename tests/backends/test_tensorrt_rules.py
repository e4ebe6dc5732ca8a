"""TensorRT conformance: mpqc's lowering for TensorRT targets passes; each broken rule is caught and named."""

from __future__ import annotations

import pathlib

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.backends.tensorrt.rules import RULES, Violation, check_tensorrt_conformance
from mpqc.data.proxy import proxy_feeds
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.pipeline.build import built_model_proto
from mpqc.pipeline.options import BuildOptions
from mpqc.policy import resolve_policy
from mpqc.targets import load_target

TARGETS = pathlib.Path(__file__).resolve().parents[2] / "targets"
TRT_A100 = str(TARGETS / "trt-a100.toml")


def lower(tmp_path, model: str, policy: str, target: str = TRT_A100, evaluate_only: bool = False) -> onnx.ModelProto:
    """The lowering alone (a build refuses to write a non-conforming model for a TensorRT target)."""
    # Conformance is structural: 8 calibration samples place the same Q/DQ nodes as the full proxy set.
    options = BuildOptions(model=model, target=target, proxy_limit=8)
    analysis, loaded_target = analyze(model), load_target(target)
    feeds, _ = proxy_feeds(options.proxy_source(), analysis.loaded)
    chosen = resolve_policy(policy, analysis.layers, analysis.ties, loaded_target, deployable_only=not evaluate_only)
    return built_model_proto(Lowering.prepare(analysis, loaded_target, feeds, options.calibration_settings()).lower(chosen))


def weight_dqs(model: onnx.ModelProto, data_type: int) -> dict[str, str]:
    """Weight DequantizeLinear of the given integer type -> the op type that reads it."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    readers = {i: n.op_type for n in model.graph.node for i in n.input}
    return {n.name: readers[n.output[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and types.get(n.input[0]) == data_type}


DEPLOYABLE = [
    ("mnist-cnn", "uniform:w8a8"),
    ("mnist-cnn", "uniform:w4a16"),
    ("mnist-cnn", "uniform:w4a8"),
    ("efficientnet-lite0", "uniform:w8a8"),
    ("efficientnet-lite0", "uniform:w4a16"),
    ("efficientnet-lite0", "uniform:w4a8"),
    ("minilm", "uniform:w8a8"),
    ("minilm", "uniform:w4a16"),
]


@pytest.mark.parametrize("model, policy", DEPLOYABLE)
def test_lowered_examples_conform(tmp_path, model, policy):
    built = lower(tmp_path, model, policy)
    assert check_tensorrt_conformance(built, int4_conv_plugin=True) == []
    int8, int4 = weight_dqs(built, TensorProto.INT8), weight_dqs(built, TensorProto.INT4)
    if policy == "uniform:w8a8":
        assert int8 and not int4
        assert check_tensorrt_conformance(built) == []
    elif policy == "uniform:w4a16":
        # INT4 weight-only is a MatMul format: every INT4 weight feeds a MatMul, convs stay float.
        assert int4 and set(int4.values()) == {"MatMul"} and not int8
        assert check_tensorrt_conformance(built) == []
    else:
        # w4a8 deploys on Conv only (through the plugin); without it, each INT4 Conv is refused.
        assert int4 and set(int4.values()) == {"Conv"}
        without_plugin = check_tensorrt_conformance(built)
        assert {v.rule for v in without_plugin} == {"int4-conv"}
        assert sorted(v.node for v in without_plugin) == sorted(int4)
        assert all("no INT4 convolution in TensorRT" in v.message for v in without_plugin)


@pytest.mark.parametrize("model", ["mnist-cnn", "minilm"])
def test_evaluate_only_int4_matmul_is_flagged(tmp_path, model):
    """--evaluate-only w4a8 gives MatMul/Gemm per-channel INT4 weights: fine for ORT, not for TensorRT."""
    built = lower(tmp_path, model, "uniform:w4a8", evaluate_only=True)
    violations = check_tensorrt_conformance(built, int4_conv_plugin=True)
    matmuls = {name for name, reader in weight_dqs(built, TensorProto.INT4).items() if reader in ("MatMul", "Gemm")}
    assert matmuls and {v.node for v in violations} == matmuls
    assert {v.rule for v in violations} == {"int4-block"}
    assert all("per-channel" in v.message and "block-wise" in v.message for v in violations)


@pytest.mark.parametrize("policy", ["uniform:w8a8", "uniform:w4a8"])
def test_orin_target_conforms(tmp_path, policy):
    built = lower(tmp_path, "mnist-cnn", policy, target=str(TARGETS / "trt-orin.toml"))
    assert check_tensorrt_conformance(built, int4_conv_plugin=True) == []


# ---- hand-made models: one valid baseline, then one broken rule at a time ----


def make_model(
    act_zero_point=np.int8(0),
    act_scale=np.float32(0.05),
    act_axis=None,
    conv_weight_type="int8",
    conv_weight_axis=0,
    qdq_between_conv_and_relu=False,
    matmul_block_size=64,
    matmul_axis=0,
) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ weight) -> Relu -> Q/DQ -> Flatten -> MatMul(INT4 block-wise DQ weight) -> y."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(array, name))
        return name

    def qdq(tensor, prefix, zero_point=np.int8(0), scale=np.float32(0.05), axis=None):
        s, z = const(f"{prefix}.scale", np.asarray(scale)), const(f"{prefix}.zero_point", np.asarray(zero_point))
        attrs = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{prefix}.q"], name=f"{prefix}.quantize", **attrs))
        nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}.q", s, z], [f"{prefix}.dq"], name=f"{prefix}.dequantize", **attrs))
        return f"{prefix}.dq"

    x = qdq("x", "x", act_zero_point, act_scale, act_axis)
    storage = {"int8": np.int8, "int4": ml_dtypes.int4}[conv_weight_type]
    w = const("conv.weight.q", rng.integers(-7, 8, (8, 4, 3, 3)).astype(storage))
    scale_shape = (8,) if conv_weight_axis == 0 else (4,)
    ws, wz = const("conv.weight.scale", np.full(scale_shape, 0.01, np.float32)), const("conv.weight.zero_point", np.zeros(scale_shape, storage))
    nodes.append(helper.make_node("DequantizeLinear", [w, ws, wz], ["conv.weight"], name="conv.weight.dq", axis=conv_weight_axis))
    nodes.append(helper.make_node("Conv", [x, "conv.weight"], ["conv.out"], name="conv", pads=[1, 1, 1, 1]))
    relu_in = qdq("conv.out", "conv.output") if qdq_between_conv_and_relu else "conv.out"
    nodes.append(helper.make_node("Relu", [relu_in], ["relu.out"], name="relu"))
    nodes.append(helper.make_node("Flatten", ["relu.out"], ["flat"], name="flatten"))
    flat = qdq("flat", "fc.input")
    k, n = 8 * 6 * 6, 10
    blocked_axis_len = k if matmul_axis == 0 else n
    blocks = -(-blocked_axis_len // matmul_block_size)
    mw = const("fc.weight.q", rng.integers(-7, 8, (k, n)).astype(ml_dtypes.int4))
    scale_shape = (blocks, n) if matmul_axis == 0 else (k, blocks)
    ms = const("fc.weight.scale", np.full(scale_shape, 0.01, np.float32))
    mz = const("fc.weight.zero_point", np.zeros(scale_shape, ml_dtypes.int4))
    nodes.append(helper.make_node("DequantizeLinear", [mw, ms, mz], ["fc.weight"], name="fc.weight.dq",
                                  axis=matmul_axis, block_size=matmul_block_size))
    nodes.append(helper.make_node("MatMul", [flat, "fc.weight"], ["y"], name="fc"))
    graph = helper.make_graph(nodes, "handmade", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_baseline_conforms():
    assert check_tensorrt_conformance(make_model()) == []


BROKEN = {
    "uint8 activation": (dict(act_zero_point=np.uint8(0)), "uint8", "x.quantize", "UINT8"),
    "nonzero zero point": (dict(act_zero_point=np.int8(3)), "zero-point", "x.quantize", "[3]"),
    "per-channel activation scale": (dict(act_scale=np.full(4, 0.05, np.float32), act_zero_point=np.zeros(4, np.int8), act_axis=1),
                                     "activation-per-tensor", "x.quantize", "per-channel"),
    "int4 conv without plugin": (dict(conv_weight_type="int4"), "int4-conv", "conv.weight.dq", "no INT4 convolution in TensorRT"),
    "block size 32": (dict(matmul_block_size=32), "int4-block", "fc.weight.dq", "block_size 32"),
    "blocks along N": (dict(matmul_axis=1), "int4-block", "fc.weight.dq", "along axis 1"),
    "qdq between conv and relu": (dict(qdq_between_conv_and_relu=True), "qdq-in-fusion", "conv.output.quantize", "Relu 'relu'"),
    "per-channel conv weight on axis 1": (dict(conv_weight_axis=1), "weight-axis", "conv.weight.dq", "axis 1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_rule_is_named(case):
    changes, rule, node, phrase = BROKEN[case]
    model = make_model(**changes)
    violations = check_tensorrt_conformance(model)
    # The activation DQ shares the Q's scale and zero point, so some rules fire on both nodes.
    assert {v.rule for v in violations} == {rule}, violations
    assert node in {v.node for v in violations}
    assert all(phrase in v.message for v in violations), violations
    assert rule in RULES


def test_old_opset_is_refused():
    model = make_model()
    model.opset_import[0].version = 20  # opset 20 has no INT4 or block-wise DequantizeLinear
    assert [(v.node, v.rule) for v in check_tensorrt_conformance(model)] == [("handmade", "opset")]
    assert "opset 20" in check_tensorrt_conformance(model)[0].message


def test_int4_conv_with_plugin():
    model = make_model(conv_weight_type="int4")
    assert check_tensorrt_conformance(model, int4_conv_plugin=True) == []
    # The plugin takes per-output-channel scales only.
    blocked = make_model(conv_weight_type="int4")
    dq = next(n for n in blocked.graph.node if n.name == "conv.weight.dq")
    dq.attribute.append(helper.make_attribute("block_size", 4))
    violations = check_tensorrt_conformance(blocked, int4_conv_plugin=True)
    assert [(v.node, v.rule) for v in violations] == [("conv.weight.dq", "int4-conv")]
    assert "per-output-channel" in violations[0].message


def test_quantizer_without_zero_point_defaults_to_uint8():
    model = make_model()
    q = next(n for n in model.graph.node if n.name == "fc.input.quantize")
    del q.input[2]
    violations = check_tensorrt_conformance(model)
    assert [(v.node, v.rule) for v in violations] == [("fc.input.quantize", "uint8")]
    assert "defaults to UINT8" in violations[0].message
    q.attribute.append(helper.make_attribute("output_dtype", TensorProto.INT8))
    assert check_tensorrt_conformance(model) == []


def test_int4_activation_and_unpaired_quantizer():
    model = make_model()
    q = next(n for n in model.graph.node if n.name == "fc.input.quantize")
    int4_zero = numpy_helper.from_array(np.zeros((), ml_dtypes.int4), "fc.input.zero_point4")
    model.graph.initializer.append(int4_zero)
    q.input[2] = "fc.input.zero_point4"
    rules = {(v.node, v.rule) for v in check_tensorrt_conformance(model)}
    assert ("fc.input.quantize", "activation-int4") in rules
    # Reading a Q's integer output with anything but a DQ leaves an integer tensor in a float graph.
    model = make_model()
    model.graph.node.append(helper.make_node("Cast", ["x.q"], ["x.cast"], name="cast", to=TensorProto.FLOAT))
    violations = check_tensorrt_conformance(model)
    assert [(v.node, v.rule) for v in violations] == [("x.quantize", "q-without-dq")]
    assert "Cast 'cast'" in violations[0].message


def test_violation_is_a_frozen_value():
    v = Violation("conv.weight.dq", "int4-conv", "no INT4 convolution in TensorRT")
    assert str(v) == "conv.weight.dq: [int4-conv] no INT4 convolution in TensorRT"
    with pytest.raises(AttributeError):
        v.rule = "other"  # type: ignore[misc]
    assert v == Violation("conv.weight.dq", "int4-conv", "no INT4 convolution in TensorRT") and hash(v)
