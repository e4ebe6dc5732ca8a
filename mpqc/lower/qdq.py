"""Lower a policy to one QDQ ONNX model.

Placement follows TensorRT's explicit-quantization rules: symmetric INT8/INT4 with zero point 0,
weights as constant integer tensors behind DequantizeLinear (per output channel, or block-wise
along the reduction axis for INT4 weight-only MatMul), activations per tensor through one
Quantize/Dequantize pair on each quantized layer's input. A target may also quantize layer
outputs: ONNX Runtime's CPU kernels (QLinearConv, QLinearMatMul) only replace DQ -> op -> Q.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from mpqc.lower import numerics
from mpqc.passes.layers import Layer
from mpqc.policy import Policy
from mpqc.targets import Target

_STORAGE = {8: (np.int8, ir.DataType.INT8), 4: (ml_dtypes.int4, ir.DataType.INT4)}


def lower(model: ir.Model, layers: list[Layer], policy: Policy, target: Target, amax: dict[str, float]) -> ir.Model:
    """Insert Q/DQ in place per `policy`; `amax` holds the calibrated range of every tensor to quantize."""
    graph = model.graph
    nodes = {node.name: node for node in graph}
    values = {v.name: v for node in graph for v in node.outputs} | {v.name: v for v in graph.inputs}
    for layer in layers:
        p = policy.precision_of(layer.name)
        if p.is_float:
            continue
        node = nodes[layer.name]
        if p.weight_granularity == "block" and node.op_type == "Gemm":
            node = nodes[layer.name] = _gemm_to_matmul(graph, node)
            layer = _as_matmul_layer(layer)
        _quantize_weight(graph, node, layer, p.weight_bits, target.int4_block_size if p.weight_granularity == "block" else None)
        if p.quantizes_activations:
            source = values[layer.activation]
            node.replace_input_with(0, _qdq(graph, source, amax[source.name], f"{layer.name}.input"))
    if target.quantize_layer_outputs:
        for layer in layers:
            p = policy.precision_of(layer.name)
            if p.quantizes_activations:
                _quantize_output(graph, nodes[layer.name], amax[layer.output], f"{layer.name}.output")
    graph.sort()
    # The float weights that were replaced by integer ones are now unused.
    return common.RemoveUnusedNodesPass()(model).model


def quantized_tensors(layers: list[Layer], policy: Policy, target: Target) -> list[str]:
    """The activation tensors whose ranges the lowering needs, in a stable order."""
    names: list[str] = []
    for layer in layers:
        p = policy.precision_of(layer.name)
        if p.quantizes_activations:
            names.append(layer.activation)
            if target.quantize_layer_outputs:
                names.append(layer.output)
    return list(dict.fromkeys(names))


def _constant(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


def _quantize_weight(graph: ir.Graph, node: ir.Node, layer: Layer, bits: int, block_size: int | None) -> None:
    weight = node.inputs[1].const_value.numpy().astype(np.float32)
    block_axis = layer.reduction_axis if block_size is not None else None
    q, scales = numerics.quantize_weight(weight, bits, layer.channel_axis, block_axis, block_size)
    storage, dtype = _STORAGE[bits]
    prefix = f"{layer.name}.weight"
    q_value = _constant(graph, f"{prefix}.q", q.astype(storage), dtype)
    scale_value = _constant(graph, f"{prefix}.scale", scales)
    zero_value = _constant(graph, f"{prefix}.zero_point", np.zeros(scales.shape, dtype=storage), dtype)
    attributes = {"axis": layer.channel_axis if block_size is None else block_axis}
    if block_size is not None:
        attributes["block_size"] = block_size
    dq = ir.node("DequantizeLinear", [q_value, scale_value, zero_value], attributes, name=f"{prefix}.dq")
    dq.outputs[0].name = f"{prefix}.dequantized"
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])


def _qdq(graph: ir.Graph, source: ir.Value, amax: float, prefix: str) -> ir.Value:
    """A fresh Q/DQ pair (symmetric INT8, per tensor) on `source`; returns the dequantized value.

    Each reader gets its own pair with its own scale and zero-point constants: ONNX Runtime fuses
    DQ -> op -> Q units and converts INT8 activations to its UINT8 kernels only for pairs that
    share nothing (a shared Q or zero point left the first convs of a residual block unfused).
    """
    scale = _constant(graph, f"{prefix}.scale", numerics.activation_scale(amax))
    zero = _constant(graph, f"{prefix}.zero_point", np.zeros((), dtype=np.int8), ir.DataType.INT8)
    q = ir.node("QuantizeLinear", [source, scale, zero], name=f"{prefix}.q")
    q.outputs[0].name = f"{prefix}.quantized"
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{prefix}.dq")
    dq.outputs[0].name = f"{prefix}.dequantized"
    dq.outputs[0].shape, dq.outputs[0].type = source.shape, source.type
    graph.append(q)
    graph.append(dq)
    return dq.outputs[0]


def _quantize_output(graph: ir.Graph, node: ir.Node, amax: float, prefix: str) -> None:
    """Q/DQ on every float reader of a quantized layer's output (readers that quantize already are skipped)."""
    output = node.outputs[0]
    consumers = [(user, index) for user, index in output.uses() if user.op_type != "QuantizeLinear"]
    for i, (user, index) in enumerate(consumers):
        user.replace_input_with(index, _qdq(graph, output, amax, f"{prefix}.{i}"))
    if output.is_graph_output():
        # Graph outputs keep their names: a final DQ takes the name, the layer output a new one.
        name = output.name
        final = _qdq(graph, output, amax, f"{prefix}.final")
        graph.outputs[graph.outputs.index(output)] = final
        output.name, final.name = f"{prefix}.float", name


def _gemm_to_matmul(graph: ir.Graph, gemm: ir.Node) -> ir.Node:
    """Gemm(x, W[N,K]^T, b) -> MatMul(x, W^T[K,N]) + b: INT4 block-wise weights are a MatMul format."""
    weight = gemm.inputs[1].const_value.numpy()
    if gemm.attributes.get_int("transB", 0):
        weight = weight.T
    alpha, beta = gemm.attributes.get_float("alpha", 1.0), gemm.attributes.get_float("beta", 1.0)
    w_value = _constant(graph, f"{gemm.name}.weight_kn", np.ascontiguousarray(weight * alpha, dtype=np.float32))
    matmul = ir.node("MatMul", [gemm.inputs[0], w_value], name=gemm.name)
    result = matmul.outputs[0]
    graph.insert_before(gemm, matmul)
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        bias = _constant(graph, f"{gemm.name}.bias_scaled", (gemm.inputs[2].const_value.numpy() * beta).astype(np.float32))
        add = ir.node("Add", [result, bias], name=f"{gemm.name}.bias")
        graph.insert_before(gemm, add)
        result = add.outputs[0]
    out = gemm.outputs[0]
    name = out.name
    ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
    graph.remove(gemm, safe=True)
    result.name, result.shape, result.type = name, out.shape, out.type
    return matmul


def _as_matmul_layer(layer: Layer) -> Layer:
    k_n = (layer.weight_shape[layer.reduction_axis], layer.weight_shape[layer.channel_axis])
    return Layer(layer.name, "MatMul", layer.activation, f"{layer.name}.weight_kn", layer.output, k_n, 1, 0)
