"""Rewrite w4a8 convolutions into `mpqc::Int4Conv` nodes for TensorRT's INT4 conv plugin.

mpqc's lowering writes a w4a8 Conv as

    x -> QuantizeLinear(s, 0) -> DequantizeLinear -> Conv <- DequantizeLinear(INT4 W, per-channel scales, 0)

which ONNX Runtime runs and TensorRT cannot (no INT4 convolution). This pass replaces each such
Conv, its weight DequantizeLinear and its activation DequantizeLinear by one node

    x -> QuantizeLinear(s, 0) -> Int4Conv (domain "mpqc", attribute plugin_namespace "mpqc")

that reads the INT8 tensor itself and carries the packed weight, scales, bias and conv attributes
as attributes (kernels.trt_int4_conv_plugin documents the interface and why). The node keeps the
Conv's name and output name, so TensorRT's layer names and everything downstream are unchanged.
It computes exactly what the replaced nodes compute: the Q's integers times x_scale, convolved with
the INT4 integers times their channel scales, plus the bias.

Only the engine build uses the rewritten model; model.qdq.onnx stays the portable QDQ model.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from mpqc_kernels.int4_layout import pack_int4
from mpqc_kernels.trt_int4_conv_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, Int4ConvSpec
from onnx_ir.passes import common

from mpqc.errors import MpqcError

DOMAIN = PLUGIN_NAMESPACE  # ONNX domain of the node; TensorRT finds the plugin by op type + plugin_namespace
DOMAIN_VERSION = 1


def rewrite_int4_convs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with every INT4-weight Conv replaced by an Int4Conv node, and those nodes' names.

    A model without INT4 convolutions comes back unchanged (and the list is empty).
    """
    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    rewritten = []
    for conv in list(graph):
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or not _has_int4_weight(conv):
            continue
        plugin = _int4_conv_node(conv)
        graph.insert_before(conv, plugin)
        _replace(graph, conv, plugin)
        rewritten.append(plugin.name)
    if not rewritten:
        return model, []
    ir_model.opset_imports[DOMAIN] = DOMAIN_VERSION
    # The weight and activation DQs the Convs read, and their initializers, are now unused.
    ir_model = common.RemoveUnusedNodesPass()(ir_model).model
    return ir.to_proto(ir_model), rewritten


def int4_conv_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the Int4Conv nodes of a (rewritten) model."""
    return [node.name for node in model.graph.node if is_int4_conv(node)]


def is_int4_conv(node: onnx.NodeProto) -> bool:
    return node.op_type == PLUGIN_NAME and node.domain == DOMAIN


def int4_conv_arguments(node: onnx.NodeProto) -> tuple[Int4ConvSpec, np.ndarray, np.ndarray, np.ndarray]:
    """(spec, packed_weight, weight_scale, bias) of an Int4Conv node, read back from its attributes:
    what TensorRT's parser hands the plugin, for evaluating the node without TensorRT."""
    values = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    arrays = {name: np.array(onnx.numpy_helper.to_array(value)) if isinstance(value, onnx.TensorProto) else value
              for name, value in values.items()}
    spec = Int4ConvSpec.from_attributes(arrays["weight_shape"], arrays["strides"], arrays["pads"], arrays["dilations"],
                                        arrays["group"], arrays["x_scale"], arrays.get("float16_output", 0))
    spec.check_weights(arrays["packed_weight"], arrays["weight_scale"], arrays["bias"])
    return spec, arrays["packed_weight"], arrays["weight_scale"], arrays["bias"]


def _has_int4_weight(conv: ir.Node) -> bool:
    dq = conv.inputs[1].producer() if len(conv.inputs) > 1 and conv.inputs[1] is not None else None
    return (dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value is not None
            and dq.inputs[0].const_value.dtype == ir.DataType.INT4)


def _int4_conv_node(conv: ir.Node) -> ir.Node:
    where = f"INT4 conv plugin: Conv '{conv.name}'"
    q_weight, weight_scale = _int4_weight(conv, where)
    x_int8, x_scale = _int8_activation(conv, where)
    out_channels = q_weight.shape[0]
    bias = _bias(conv, out_channels, where)
    output_type = conv.outputs[0].dtype
    if output_type not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise MpqcError(f"{where}: the plugin writes FLOAT or FLOAT16, but the Conv's output is {output_type}")
    spec = Int4ConvSpec.from_attributes(q_weight.shape, *_conv_attributes(conv, q_weight.shape, x_int8, where), x_scale,
                                        output_type == ir.DataType.FLOAT16)
    packed = pack_int4(q_weight.reshape(out_channels, -1)).view(np.int8).reshape(-1)
    attributes = {
        "plugin_namespace": PLUGIN_NAMESPACE,
        "weight_shape": ir.tensor(np.array(spec.weight_shape, np.int32)),
        "packed_weight": ir.tensor(packed),
        "weight_scale": ir.tensor(weight_scale),
        "bias": ir.tensor(bias),
        "strides": ir.tensor(np.array(spec.strides, np.int32)),
        "pads": ir.tensor(np.array(spec.pads, np.int32)),
        "dilations": ir.tensor(np.array(spec.dilations, np.int32)),
        "group": spec.group,
        "x_scale": spec.x_scale,
        "float16_output": int(spec.float16_output),
    }
    node = ir.node(PLUGIN_NAME, [x_int8], attributes, domain=DOMAIN, name=conv.name)
    node.outputs[0].dtype = output_type
    node.outputs[0].shape = conv.outputs[0].shape
    return node


def _int4_weight(conv: ir.Node, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The INT4 weight as int8 integers (O, C/g, KH, KW) and its per-output-channel scales (O,)."""
    dq = conv.inputs[1].producer()
    q = dq.inputs[0].const_value.numpy().astype(np.int8)
    if q.ndim != 4:
        raise MpqcError(f"{where}: the plugin runs 2-D convolutions; this weight has shape {q.shape}")
    if dq.attributes.get_int("block_size", 0):
        raise MpqcError(f"{where}: the plugin takes per-output-channel INT4 scales, not block-wise ones")
    scale = _constant(dq.inputs[1], f"{where}: weight scale")
    if scale.size == 1:
        scale = np.full(q.shape[0], scale.reshape(-1)[0])
    elif scale.shape != (q.shape[0],) or dq.attributes.get_int("axis", 1) not in (0, -4):
        raise MpqcError(f"{where}: the plugin takes per-output-channel weight scales (axis 0), got shape {scale.shape}")
    _check_zero(dq, where + " weight")
    return q, scale.astype(np.float32)


def _int8_activation(conv: ir.Node, where: str) -> tuple[ir.Value, float]:
    """The INT8 tensor the Conv's activation DQ reads, and its per-tensor scale."""
    dq = conv.inputs[0].producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        raise MpqcError(f"{where}: w4a8 needs an INT8-quantized input (QuantizeLinear -> DequantizeLinear), found "
                        f"{dq.op_type if dq is not None else 'a graph input'}")
    x_int8 = dq.inputs[0]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero is None or (zero.const_value is not None and zero.const_value.dtype != ir.DataType.INT8):
        raise MpqcError(f"{where}: the plugin takes signed INT8 activations (zero point 0, INT8)")
    _check_zero(dq, where + " activation")
    scale = _constant(dq.inputs[1], f"{where}: activation scale")
    if scale.size != 1:
        raise MpqcError(f"{where}: the plugin takes a per-tensor activation scale, got shape {scale.shape}")
    return x_int8, float(scale.reshape(-1)[0])


def _bias(conv: ir.Node, out_channels: int, where: str) -> np.ndarray:
    if len(conv.inputs) < 3 or conv.inputs[2] is None:
        return np.zeros(out_channels, np.float32)
    bias = _constant(conv.inputs[2], f"{where}: bias").astype(np.float32).reshape(-1)
    if bias.shape != (out_channels,):
        raise MpqcError(f"{where}: bias has shape {bias.shape}, expected ({out_channels},)")
    return bias


def _conv_attributes(conv: ir.Node, weight_shape, x_int8: ir.Value, where: str):
    """(strides, pads, dilations, group) with auto_pad resolved to explicit ONNX pads."""
    strides = tuple(conv.attributes.get_ints("strides", [1, 1]))
    dilations = tuple(conv.attributes.get_ints("dilations", [1, 1]))
    group = conv.attributes.get_int("group", 1)
    kernel = tuple(conv.attributes.get_ints("kernel_shape", weight_shape[2:]))
    if kernel != tuple(weight_shape[2:]):
        raise MpqcError(f"{where}: kernel_shape {kernel} does not match the weight {tuple(weight_shape)}")
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = tuple(conv.attributes.get_ints("pads", [0, 0, 0, 0]))
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    else:
        pads = _same_pads(auto_pad, x_int8, kernel, strides, dilations, where)
    return strides, pads, dilations, group


def _same_pads(auto_pad: str, x: ir.Value, kernel, strides, dilations, where: str) -> tuple[int, int, int, int]:
    """ONNX SAME_UPPER/SAME_LOWER as explicit pads: output = ceil(input / stride)."""
    height_width = _static_height_width(x)
    if height_width is None:
        raise MpqcError(f"{where}: auto_pad {auto_pad} needs a static input height and width")
    begin, end = [], []
    for size, k, s, d in zip(height_width, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin[0], begin[1], end[0], end[1]


def _static_height_width(x: ir.Value) -> tuple[int, int] | None:
    """H and W of the INT8 tensor, or of the tensor its QuantizeLinear read (same shape)."""
    producer = x.producer()
    for value in (x, *(producer.inputs[:1] if producer is not None and producer.op_type == "QuantizeLinear" else ())):
        shape = value.shape
        if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in list(shape)[2:]):
            return tuple(list(shape)[2:])
    return None


def _replace(graph: ir.Graph, conv: ir.Node, plugin: ir.Node) -> None:
    old = conv.outputs[0]
    name = old.name
    ir.convenience.replace_all_uses_with(old, plugin.outputs[0], replace_graph_outputs=True)
    graph.remove(conv, safe=True)
    plugin.outputs[0].name = name


def _check_zero(dq: ir.Node, where: str) -> None:
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero is None:
        return
    values = _constant(zero, f"{where} zero point")
    if np.any(values.astype(np.int64) != 0):
        raise MpqcError(f"{where}: zero point must be 0 (symmetric quantization)")


def _constant(value: ir.Value, what: str) -> np.ndarray:
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
            tensor = producer.attributes["value"].as_tensor()
    if tensor is None:
        raise MpqcError(f"{what} '{value.name}' is computed; the plugin needs a constant")
    array = tensor.numpy()
    return array.astype(np.int8) if array.dtype == ml_dtypes.int4 else np.asarray(array)
