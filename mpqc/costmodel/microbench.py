"""Time one layer signature at one precision: a micro-model of that layer alone, lowered by the
same code that lowers whole models (so it carries the Q/DQ nodes a real layer gets), run in the
target's runtime with warm-up and repeats until the median is stable."""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mpqc.backends.base import backend_for
from mpqc.frontend.onnx_file import prepare
from mpqc.frontend.resolve import LoadedModel
from mpqc.lower.lowering import CalibrationSettings, Lowering
from mpqc.passes.analysis import analyze_loaded
from mpqc.passes.signatures import Signature
from mpqc.policy import Policy
from mpqc.targets import Target

_MIN_RUNS, _MAX_RUNS, _ROUND, _STABLE = 25, 400, 25, 0.02


def micro_model(signature: Signature, batch: int, seed: int = 0, output_read: bool = True) -> onnx.ModelProto:
    """A float ONNX model with one layer of this signature. With `output_read`, an Identity reads
    its output so the lowering quantizes the output as it would inside a network; without, the
    output stays float, as when the only reader is a layer the policy keeps float."""
    rng = np.random.default_rng(seed)
    input_shape = [batch if isinstance(d, str) else d for d in signature.input_shape]
    weight = (rng.standard_normal(signature.weight_shape) / np.sqrt(np.prod(signature.weight_shape[1:]))).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "layer.weight")]
    if signature.op_type == "Conv":
        inits.append(numpy_helper.from_array(rng.standard_normal(signature.weight_shape[0]).astype(np.float32), "layer.bias"))
        attrs = {"strides": list(signature.strides), "dilations": list(signature.dilations), "group": signature.groups}
        if signature.pads == ("same",):
            attrs["auto_pad"] = "SAME_UPPER"
        else:
            attrs["pads"] = list(signature.pads)
        layer = helper.make_node("Conv", ["x", "layer.weight", "layer.bias"], ["y"], name="layer", **attrs)
    elif signature.op_type == "Gemm":
        # Gemm weights come transposed (N, K) from torch exports; the input's last dim says which.
        trans_b = int(signature.weight_shape[-1] == input_shape[-1])
        bias_len = signature.weight_shape[0] if trans_b else signature.weight_shape[1]
        inits.append(numpy_helper.from_array(np.zeros(bias_len, np.float32), "layer.bias"))
        layer = helper.make_node("Gemm", ["x", "layer.weight", "layer.bias"], ["y"], name="layer", transB=trans_b)
    else:
        layer = helper.make_node("MatMul", ["x", "layer.weight"], ["y"], name="layer")
    nodes = [layer, helper.make_node("Identity", ["y"], ["out"], name="reader")] if output_read else [layer]
    graph = helper.make_graph(
        nodes, "micro",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("out" if output_read else "y", TensorProto.FLOAT,
                                       [batch if isinstance(d, str) else d for d in signature.output_shape])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def time_layer(signature: Signature, precision: str, target: Target, batch: int, output_read: bool = True) -> dict:
    """Lower the micro-model at `precision` and time it; returns median/p10/p90/std in ms."""
    model = prepare(micro_model(signature, batch, output_read=output_read), f"micro:{signature.key()}")
    analysis = analyze_loaded(LoadedModel(f"micro:{signature.key()}", "onnx", model, None))
    shape = [batch if isinstance(d, str) else d for d in signature.input_shape]
    # Ranges matter for the numbers, not the speed; a fixed-seed normal input calibrates them.
    feeds = {"x": np.random.default_rng(1).standard_normal([min(4, batch), *shape[1:]]).astype(np.float32)}
    lowering = Lowering.prepare(analysis, target, feeds, CalibrationSettings(bias_correction=False))
    policy = Policy(((analysis.layers[0].name, precision),), f"uniform:{precision}")
    runner = backend_for(target).load(lowering.lower(policy), target)
    inputs = {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    stats = measure_until_stable(lambda: runner.run(inputs))
    # Every micro-model run pays the runtime's per-call cost (binding, input copy, launch) that a
    # whole model pays once: timed on a model that only passes its input on, and taken off.
    frame = backend_for(target).load(_frame_model(shape).SerializeToString(), target)
    frame_ms = measure_until_stable(lambda: frame.run(inputs))["median_ms"]
    return stats | {"raw_median_ms": stats["median_ms"], "frame_ms": frame_ms,
                    "median_ms": max(stats["median_ms"] - frame_ms, 0.0)}


def _frame_model(shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["out"], name="frame")], "frame",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def measure_until_stable(call) -> dict:
    """Repeat until the median of the latest round agrees with the overall median within 2%."""
    for _ in range(5):
        call()
    times: list[float] = []
    while len(times) < _MAX_RUNS:
        for _ in range(_ROUND):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= _MIN_RUNS:
            overall, latest = np.median(times), np.median(times[-_ROUND:])
            if abs(latest - overall) <= _STABLE * overall:
                break
    values = np.asarray(times)
    return {
        "median_ms": float(np.median(values)),
        "p10_ms": float(np.percentile(values, 10)),
        "p90_ms": float(np.percentile(values, 90)),
        "std_ms": float(values.std()),
        "runs": int(values.size),
    }
