"""Find the quantizable layers: Conv, Gemm and MatMul whose weight is a constant."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from mpqc.passes.check_weights import check_finite


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str  # the ONNX node name; for torch models, the torch module name
    op_type: str
    activation: str  # name of the float input tensor that the layer reads
    weight: str  # name of the constant weight
    output: str
    weight_shape: tuple[int, ...]
    # Axis of the weight that holds output channels (per-channel scales) and the reduction axis
    # (block-wise INT4 scales): Conv (O,I/g,kh,kw): 0/1; MatMul (K,N): 1/0; Gemm transB=1 (N,K): 0/1.
    channel_axis: int
    reduction_axis: int


def find_layers(model: ir.Model) -> list[Layer]:
    """Quantizable layers in topological order (the order is part of every hash we make)."""
    layers = []
    for node in model.graph:
        layer = _as_layer(node)
        if layer is not None:
            layers.append(layer)
    return layers


def _as_layer(node: ir.Node) -> Layer | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    activation, weight = node.inputs[0], node.inputs[1]
    if weight.const_value is None or activation.const_value is not None:
        return None
    shape = tuple(int(d) for d in weight.const_value.shape)
    if weight.const_value.size == 0:
        return None  # nothing to quantize: the layer stays as it is
    check_finite(node)  # canonicalize checked the user's tensors; this catches what folding made of them
    if node.op_type == "Conv":
        channel_axis, reduction_axis = 0, 1
    elif node.op_type == "MatMul":
        if len(shape) != 2:
            return None  # batched constant MatMul: not a layer with output channels
        channel_axis, reduction_axis = 1, 0
    else:
        if node.attributes.get_int("transA", 0):
            return None
        trans_b = node.attributes.get_int("transB", 0)
        channel_axis, reduction_axis = (0, 1) if trans_b else (1, 0)
    return Layer(
        name=node.name,
        op_type=node.op_type,
        activation=activation.name,
        weight=weight.name,
        output=node.outputs[0].name,
        weight_shape=shape,
        channel_axis=channel_axis,
        reduction_axis=reduction_axis,
    )
