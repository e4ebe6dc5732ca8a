"""Does a QDQ ONNX model follow TensorRT's explicit-quantization rules? Checked without TensorRT.

TensorRT takes all precision from the Q/DQ graph (strongly typed networks; precision flags are
gone in 11.x), so a model it cannot run as written fails at engine build time on a machine that
may not be ours. This checker reads the model and names every place that breaks a rule, so a
TensorRT target's build can be refused here, where the lowering happened.

The rules (facts from TensorRT 10.x/11.x documentation and headers):
- symmetric quantization only: every zero point is 0; INT8, never UINT8;
- activations: INT8 per tensor (one scalar scale); per-channel scales only on constant weights;
- scales are build-time constants of rank <= 2;
- INT4 is weight-only: constant MatMul/Gemm weights quantized block-wise along K, blocks of 64
  or 128. TensorRT has no INT4 convolution; mpqc's INT4 conv plugin takes per-output-channel
  INT4 Conv weights, allowed only when the caller says the plugin is there;
- opset >= 21 (INT4 and block-wise DequantizeLinear);
- no Q/DQ between Conv, BatchNormalization and ReLU/Clip: TensorRT fuses them, and a quantizer
  in between either blocks the fusion or sits where no tensor exists any more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

RULES = {
    "opset": "the default ONNX domain is opset 21 or newer",
    "zero-point": "every Q/DQ zero point is a constant 0 (symmetric quantization)",
    "uint8": "no UINT8 quantization: TensorRT's INT8 is signed and symmetric",
    "quant-type": "quantized tensors are INT8, or INT4 for constant weights",
    "constant-scale": "Q/DQ scales are build-time constants",
    "scale-rank": "Q/DQ scales have rank <= 2",
    "activation-per-tensor": "activations are quantized per tensor: one scalar scale, no blocks",
    "activation-int4": "INT4 only on constant weights, never on activations",
    "weight-axis": "per-channel weight scales run along the output-channel axis",
    "int8-block": "INT8 weights are per tensor or per channel, not block-wise",
    "int4-block": "INT4 MatMul/Gemm weights are block-wise along K with block_size 64 or 128",
    "int4-conv": "no INT4 convolution in TensorRT; mpqc's INT4 conv plugin takes per-output-channel INT4 weights",
    "int4-consumer": "INT4 weights feed the weight input of MatMul, Gemm or (with the plugin) Conv",
    "q-without-dq": "a QuantizeLinear output is read only by DequantizeLinear",
    "qdq-in-fusion": "no Q/DQ between Conv, BatchNormalization and ReLU/Clip (TensorRT fuses them)",
}

MIN_OPSET = 21
INT4_BLOCK_SIZES = (64, 128)
# Ops TensorRT fuses into the op that produces their input; a Q/DQ pair must come after them.
_FUSED_INTO = {"Conv": ("BatchNormalization", "Relu", "Clip"), "BatchNormalization": ("Relu", "Clip")}
_ALLOWED_TYPES = (ir.DataType.INT8, ir.DataType.INT4)


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str  # the offending node's name (the model itself for model-wide rules)
    rule: str  # a key of RULES
    message: str  # what is wrong and where, in one sentence

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"


def check_tensorrt_conformance(model: onnx.ModelProto, int4_conv_plugin: bool = False) -> list[Violation]:
    """Every violation of TensorRT's explicit-quantization rules in `model`, in graph order.

    int4_conv_plugin: the engine will be built with mpqc's INT4 convolution plugin, which makes
    per-output-channel INT4 Conv weights legal.
    """
    ir_model = ir.from_proto(model)
    violations = _check_opset(ir_model)
    for index, node in enumerate(ir_model.graph.all_nodes()):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = node.name or f"{node.op_type}#{index}"
        violations += _check_quantizer(node, label, int4_conv_plugin)
        if node.op_type == "QuantizeLinear":
            violations += _check_q_readers(node, label)
    return violations


def _check_opset(model: ir.Model) -> list[Violation]:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None or version < MIN_OPSET:
        return [Violation(model.graph.name or "model", "opset",
                          f"the model imports ONNX opset {version}; TensorRT's INT4 and block-wise Q/DQ need opset >= {MIN_OPSET}")]
    return []


def _check_quantizer(node: ir.Node, label: str, int4_conv_plugin: bool) -> list[Violation]:
    found = []
    x, scale = node.inputs[0], node.inputs[1]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    what = f"{node.op_type} of '{x.name}'"
    qtype = _quantized_type(node)

    if zero_point is not None:
        zero = _constant(zero_point)
        if zero is None:
            found.append(Violation(label, "zero-point", f"{what}: zero point '{zero_point.name}' is computed; TensorRT needs a constant 0"))
        elif np.any(zero.astype(np.int64) != 0):
            values = np.unique(zero.astype(np.int64))
            found.append(Violation(label, "zero-point", f"{what}: zero point '{zero_point.name}' holds {values[:4].tolist()}; TensorRT is symmetric (zero point 0)"))
    verb = "quantizes to" if node.op_type == "QuantizeLinear" else "reads"
    if qtype == ir.DataType.UINT8:
        how = "its zero point is UINT8" if zero_point is not None else "without a zero point or output_dtype it defaults to UINT8"
        found.append(Violation(label, "uint8", f"{what} {verb} UINT8 ({how}); TensorRT takes signed INT8 only"))
    elif qtype is not None and qtype not in _ALLOWED_TYPES:
        # TensorRT also has FP8/FP4, but not on the Ampere GPUs (A100, Orin) mpqc targets.
        found.append(Violation(label, "quant-type", f"{what} {verb} {qtype.name}; mpqc's TensorRT targets take INT8, and INT4 weights"))

    scale_array = _constant(scale)
    if scale_array is None:
        found.append(Violation(label, "constant-scale", f"{what}: scale '{scale.name}' is computed; TensorRT needs build-time constant scales"))
    scale_shape = scale_array.shape if scale_array is not None else tuple(scale.shape or ())
    if len(scale_shape) > 2:
        found.append(Violation(label, "scale-rank", f"{what}: scale '{scale.name}' has rank {len(scale_shape)} (shape {scale_shape}); TensorRT takes rank <= 2"))

    block_size = node.attributes.get_int("block_size", 0)
    per_tensor = int(np.prod(scale_shape)) == 1 and block_size == 0
    if not _is_weight(node):
        if qtype == ir.DataType.INT4:
            found.append(Violation(label, "activation-int4", f"{what}: activation '{x.name}' is quantized to INT4; TensorRT's INT4 is weight-only"))
        if not per_tensor:
            kind = f"block-wise (block_size {block_size})" if block_size else f"per-channel (scale shape {scale_shape})"
            found.append(Violation(label, "activation-per-tensor", f"{what}: activation '{x.name}' is quantized {kind}; TensorRT quantizes activations per tensor"))
        return found
    if node.op_type == "DequantizeLinear":
        found += _check_weight_readers(node, label, what, qtype, per_tensor, block_size, int4_conv_plugin)
    return found


def _check_weight_readers(node, label, what, qtype, per_tensor, block_size, int4_conv_plugin) -> list[Violation]:
    """The granularity a constant weight's DequantizeLinear needs depends on the op that reads it."""
    found = []
    rank = len(_weight_shape(node))
    axis = node.attributes.get_int("axis", 1)
    axis = axis + rank if axis < 0 and rank else axis
    for reader, index in node.outputs[0].uses():
        where = f"{what} feeding {reader.op_type} '{reader.name}'"
        is_weight_input = index == 1 and reader.op_type in ("Conv", "MatMul", "Gemm")
        if qtype == ir.DataType.INT4:
            found += _check_int4_reader(label, where, reader, is_weight_input, per_tensor, block_size, axis, rank, int4_conv_plugin)
        elif qtype == ir.DataType.INT8 and block_size:
            found.append(Violation(label, "int8-block", f"{where}: INT8 weight is block-wise (block_size {block_size}); TensorRT takes INT8 per tensor or per channel"))
        elif qtype == ir.DataType.INT8 and is_weight_input and not per_tensor:
            expected = _output_channel_axis(reader, rank)
            if axis != expected:
                found.append(Violation(label, "weight-axis", f"{where}: per-channel scales run along axis {axis}, but the output channels of this {reader.op_type} weight are axis {expected}"))
    return found


def _check_int4_reader(label, where, reader, is_weight_input, per_tensor, block_size, axis, rank, int4_conv_plugin) -> list[Violation]:
    if not is_weight_input:
        return [Violation(label, "int4-consumer", f"{where}: INT4 weights must be the weight input (1) of MatMul, Gemm or plugin Conv, here input of {reader.op_type}")]
    if reader.op_type == "Conv":
        if not int4_conv_plugin:
            return [Violation(label, "int4-conv", f"{where}: no INT4 convolution in TensorRT; use w8a8 for this Conv or build with mpqc's INT4 conv plugin")]
        if block_size or (not per_tensor and axis != 0):
            got = f"block_size {block_size}" if block_size else f"axis {axis}"
            return [Violation(label, "int4-conv", f"{where}: mpqc's INT4 conv plugin takes per-output-channel scales (axis 0, no blocks), got {got}")]
        return []
    expected = _reduction_axis(reader, rank)
    if not block_size:
        return [Violation(label, "int4-block", f"{where}: INT4 weight is per-{'tensor' if per_tensor else 'channel'}; TensorRT needs block-wise INT4 along K (axis {expected}, block_size 64 or 128)")]
    if block_size not in INT4_BLOCK_SIZES:
        return [Violation(label, "int4-block", f"{where}: block_size {block_size}; TensorRT takes INT4 blocks of 64 or 128")]
    if axis != expected:
        return [Violation(label, "int4-block", f"{where}: INT4 blocks run along axis {axis}, but this {reader.op_type} reduces its weight along axis {expected} (K)")]
    return []


def _check_q_readers(node: ir.Node, label: str) -> list[Violation]:
    found = []
    out = node.outputs[0]
    for reader, _ in out.uses():
        if reader.op_type != "DequantizeLinear":
            found.append(Violation(label, "q-without-dq", f"QuantizeLinear output '{out.name}' is read by {reader.op_type} '{reader.name}'; TensorRT pairs every Q with a DequantizeLinear"))
            continue
        found += _check_fusion(node, label, reader)
    return found


def _check_fusion(q: ir.Node, label: str, dq: ir.Node) -> list[Violation]:
    """Conv -> Q -> DQ -> Relu: the pair splits a Conv+ReLU TensorRT would fuse; it belongs after the Relu."""
    source = q.inputs[0].producer()
    if source is None or source.op_type not in _FUSED_INTO:
        return []
    found = []
    for reader, _ in dq.outputs[0].uses():
        if reader.op_type in _FUSED_INTO[source.op_type]:
            found.append(Violation(label, "qdq-in-fusion",
                                   f"Q/DQ on '{q.inputs[0].name}' sits between {source.op_type} '{source.name}' and {reader.op_type} "
                                   f"'{reader.name}', which TensorRT fuses; quantize the output of '{reader.name}' instead"))
    return found


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    """The integer type of a Q's output or a DQ's input; None when the model does not say."""
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return _dtype(node.inputs[2])
    if node.op_type == "QuantizeLinear":
        # Without a zero point, opset 21's output_dtype decides; its default (0) means UINT8.
        output_dtype = node.attributes.get_int("output_dtype", 0)
        return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8
    x = node.inputs[0]
    if _dtype(x) is not None:
        return _dtype(x)
    producer = x.producer()
    return _quantized_type(producer) if producer is not None and producer.op_type == "QuantizeLinear" else None


def _dtype(value: ir.Value) -> ir.DataType | None:
    if value.dtype is not None:
        return value.dtype
    constant = _constant_tensor(value)
    return constant.dtype if constant is not None else None


def _is_weight(node: ir.Node) -> bool:
    """A constant weight: the quantizer reads a constant, or a DQ reads a Q of a constant (fake-quantized weights)."""
    x = node.inputs[0]
    if _constant_tensor(x) is not None:
        return True
    producer = x.producer()
    return (node.op_type == "DequantizeLinear" and producer is not None and producer.op_type == "QuantizeLinear"
            and _constant_tensor(producer.inputs[0]) is not None)


def _weight_shape(node: ir.Node) -> tuple[int, ...]:
    x = node.inputs[0]
    producer = x.producer()
    if _constant_tensor(x) is None and producer is not None:
        x = producer.inputs[0]
    tensor = _constant_tensor(x)
    return tuple(tensor.shape) if tensor is not None else tuple(x.shape or ())


def _output_channel_axis(reader: ir.Node, rank: int) -> int:
    """Conv (O, I/g, kh, kw): 0. MatMul (..., K, N): last. Gemm: 0 with transB=1 (N, K), else 1."""
    if reader.op_type == "Conv":
        return 0
    if reader.op_type == "Gemm":
        return 0 if reader.attributes.get_int("transB", 0) else 1
    return rank - 1


def _reduction_axis(reader: ir.Node, rank: int) -> int:
    if reader.op_type == "Gemm":
        return 1 if reader.attributes.get_int("transB", 0) else 0
    return rank - 2


def _constant_tensor(value: ir.Value | None):
    """The value's constant tensor (an initializer or a Constant node's output), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor()
    return None


def _constant(value: ir.Value | None) -> np.ndarray | None:
    tensor = _constant_tensor(value)
    return None if tensor is None else np.asarray(tensor.numpy())
