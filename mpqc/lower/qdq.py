"""Lower a policy to one QDQ ONNX model.

Weights become constant integer tensors behind DequantizeLinear: symmetric, zero point 0, per
output channel, or block-wise along the reduction axis for INT4 weight-only MatMul. Activations
are quantized per tensor by one QuantizeLinear per tensor and one DequantizeLinear per reader, on
the input of every layer that quantizes activations (TensorRT's explicit-quantization placement).
A target may also quantize layer outputs (ONNX Runtime only replaces DQ -> op -> Q units with its
integer kernels); the output quantizer then sits after a following ReLU/Clip, where TensorRT wants
it too and where ONNX Runtime can fold the clamp into the zero point.

Between quantized layers a target may also quantize the ops it has integer kernels for (its
`region_ops`: residual Adds, Concat, pooling) and the ops that only move values (its
`region_passthrough_ops`, which keep their input's scale so the runtime drops their Q/DQ pair).
Such an op joins the region when every data input is already quantized, so consecutive INT8
layers chain through it in integer kernels instead of running as islands with a DQ and a Q at
every Add. A layer the policy keeps float is a region boundary: nothing it reads is quantized.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from mpqc.lower import numerics
from mpqc.lower.bias_correction import output_shift
from mpqc.passes.layers import Layer
from mpqc.policy import Policy
from mpqc.targets import Target

_STORAGE = {8: (np.int8, ir.DataType.INT8), 4: (ml_dtypes.int4, ir.DataType.INT4)}
_CLAMPS = ("Relu", "Clip")


@dataclasses.dataclass
class ActivationSite:
    """One activation tensor to quantize and the (node name, input index) pairs that read it quantized."""

    value: str
    readers: list[tuple[str, int]]
    prefix: str
    # The site whose calibrated range this one uses: a pass-through op's output keeps its input's
    # scale (ONNX Runtime drops DQ -> Reshape -> Q only when both sides agree). None: its own range.
    range_of: str | None = None

    @property
    def range_name(self) -> str:
        return self.range_of or self.value


def plan_activation_quantizers(model: ir.Model, layers: list[Layer], policy: Policy, target: Target) -> list[ActivationSite]:
    """Where activation Q/DQ go, in a stable order; calibration measures exactly these tensors."""
    graph = model.graph
    values = values_by_name(graph)
    sites: dict[str, ActivationSite] = {}

    def add(value: ir.Value, readers: list[tuple[str, int]], prefix: str) -> None:
        site = sites.setdefault(value.name, ActivationSite(value.name, [], prefix))
        site.readers.extend(r for r in readers if r not in site.readers)

    quantizing = [layer for layer in layers if policy.precision_of(layer.name).quantizes_activations]
    # Layers the policy keeps float (fp32, weight-only) read float tensors. Fed a DQ with a Q after
    # them, ONNX Runtime would quantize their weights itself and silently override the policy.
    float_layers = {layer.name for layer in layers} - {layer.name for layer in quantizing}
    for layer in quantizing:
        add(values[layer.activation], [(layer.name, 0)], f"{layer.name}.input")
    if target.quantize_layer_outputs:
        for layer in quantizing:
            end = through_clamps(values[layer.output])
            # A graph output stays float: quantizing logits or embeddings only adds error.
            readers = [(user.name, index) for user, index in end.uses() if user.name not in float_layers]
            if readers:
                add(end, readers, f"{layer.name}.output")
    if target.region_ops or target.region_passthrough_ops:
        _join_regions(graph, sites, add, {layer.name for layer in layers}, float_layers, target)
    return list(sites.values())


def _join_regions(graph: ir.Graph, sites: dict[str, ActivationSite], add, layer_names: set[str],
                  float_layers: set[str], target: Target) -> None:
    """Quantize the region ops whose data inputs are all quantized, in graph (topological) order."""
    for node in graph:
        passthrough = node.op_type in target.region_passthrough_ops
        if node.name in layer_names or node.domain not in ("", "ai.onnx") or not (passthrough or node.op_type in target.region_ops):
            continue
        data = [node.inputs[0]] if passthrough else list(node.inputs)
        if not data or any(value is None or value.name not in sites for value in data):
            continue  # a float or constant input: the op stays float, a region boundary
        for index, value in enumerate(data):
            add(value, [(node.name, index)], "")
        end = through_clamps(node.outputs[0])
        readers = [(user.name, index) for user, index in end.uses() if user.name not in float_layers]
        if not readers:
            continue  # only a graph output or float layers read it: it stays float
        add(end, readers, f"{node.name or end.name}.output")
        if passthrough and end is node.outputs[0]:
            sites[end.name].range_of = sites[data[0].name].range_name


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value the graph's nodes produce, and its inputs, by name."""
    return {v.name: v for node in graph for v in node.outputs} | {v.name: v for v in graph.inputs}


def through_clamps(value: ir.Value) -> ir.Value:
    """Follow a layer output through a lone ReLU/Clip: the quantizer belongs after the clamp."""
    while not value.is_graph_output() and len(value.uses()) == 1:
        user = next(iter(value.uses()))[0]
        if user.op_type not in _CLAMPS or user.domain not in ("", "ai.onnx"):
            break
        value = user.outputs[0]
    return value


def lower(
    model: ir.Model,
    layers: list[Layer],
    policy: Policy,
    target: Target,
    sites: list[ActivationSite],
    ranges: dict[str, tuple[float, float]],
    input_means: dict[str, np.ndarray] | None = None,
) -> ir.Model:
    """Insert Q/DQ in place per `policy`; `ranges` holds the calibrated (low, high) of every site.

    With `input_means` (layer name -> mean input per channel) each quantized layer's bias is
    corrected for the mean error of its rounded weights.
    """
    input_means = input_means or {}
    graph = model.graph
    nodes = {node.name: node for node in graph}
    activation = {site.value: numerics.activation_params(*ranges[site.range_name], target.activation_type) for site in sites}
    input_scales = {reader: activation[site.value][0] for site in sites for reader, index in site.readers if index == 0}
    for layer in layers:
        p = policy.precision_of(layer.name)
        if p.is_float:
            continue
        node = nodes[layer.name]
        if p.weight_granularity == "block" and node.op_type == "Gemm":
            node = nodes[layer.name] = _gemm_to_matmul(graph, node)
            layer = _as_matmul_layer(layer)
        block_size = target.int4_block_size if p.weight_granularity == "block" else None
        _quantize_weight(graph, node, layer, p.weight_bits, block_size, input_means.get(layer.name),
                         input_scales.get(layer.name) if block_size is None else None)
    values = values_by_name(graph)
    for site in sites:
        _quantize_activation(graph, values[site.value], site, nodes, *activation[site.value])
    if target.int32_gemm_bias:
        for layer in layers:
            if layer.op_type == "Gemm" and layer.name in input_scales and policy.precision_of(layer.name).weight_bits == 8:
                _quantize_gemm_bias(graph, nodes[layer.name], input_scales[layer.name])
    graph.sort()
    # The float weights that were replaced by integer ones are now unused.
    return common.RemoveUnusedNodesPass()(model).model


def _quantize_activation(graph, value, site, nodes, scale_array, zero_array) -> None:
    dtype = ir.DataType.INT8 if zero_array.dtype == np.int8 else ir.DataType.UINT8
    scale = _constant(graph, f"{site.prefix}.scale", scale_array)
    zero = _constant(graph, f"{site.prefix}.zero_point", zero_array, dtype)
    q = ir.node("QuantizeLinear", [value, scale, zero], name=f"{site.prefix}.q")
    q.outputs[0].name = f"{site.prefix}.quantized"
    graph.append(q)
    for i, (reader, index) in enumerate(site.readers):
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{site.prefix}.dq{i}")
        dq.outputs[0].name = f"{site.prefix}.dequantized{i}"
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
        graph.append(dq)
        nodes[reader].replace_input_with(index, dq.outputs[0])


def _constant(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
    graph.register_initializer(value)
    return value


# The INT32 bias of an integer kernel (bias / (input scale x weight scale), rounded) must fit with
# room for the accumulated products; ONNX Runtime's cast would wrap around silently.
_BIAS_LIMIT = 2.0**30


def _quantize_weight(
    graph: ir.Graph, node: ir.Node, layer: Layer, bits: int, block_size: int | None, input_mean: np.ndarray | None,
    input_scale: np.float32 | None = None,
) -> None:
    weight = node.inputs[1].const_value.numpy().astype(np.float32)
    block_axis = layer.reduction_axis if block_size is not None else None
    min_scales = None
    bias = node.inputs[2] if layer.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 else None
    if input_scale is not None and bias is not None and bias.const_value is not None:
        # A channel whose weights are all but zero would get a scale so small that its bias
        # overflows INT32 (seen on EfficientNet-Lite0's stem): its scale is raised just enough.
        values = np.abs(bias.const_value.numpy().astype(np.float64)).reshape(-1)
        if values.size == weight.shape[layer.channel_axis]:
            min_scales = (values / (float(input_scale) * _BIAS_LIMIT)).astype(np.float32)
    q, scales = numerics.quantize_weight(weight, bits, layer.channel_axis, block_axis, block_size, min_scales)
    if input_mean is not None:
        scale_axis = layer.channel_axis if block_size is None else block_axis
        dequantized = q * numerics.expand_scales(scales, weight.shape, scale_axis, block_size)
        groups = node.attributes.get_int("group", 1) if layer.op_type == "Conv" else 1
        _subtract_from_bias(graph, node, layer, output_shift(layer, weight, dequantized, input_mean, groups))
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


def _quantize_gemm_bias(graph: ir.Graph, gemm: ir.Node, input_scale: np.float32) -> None:
    """The bias as INT32 behind a DQ with scale input scale x weight scale, zero point 0.

    ONNX Runtime quantizes Conv and Gemm biases itself only when a Q follows the layer; a Gemm whose
    output stays float (a classifier's logits) becomes QGemm only with its bias already INT32.
    """
    if len(gemm.inputs) < 3 or gemm.inputs[2] is None or gemm.inputs[2].const_value is None:
        return
    weight_dq = gemm.inputs[1].producer()
    bias = gemm.inputs[2].const_value.numpy().astype(np.float64) * gemm.attributes.get_float("beta", 1.0)
    scales = (np.float64(input_scale) * weight_dq.inputs[1].const_value.numpy().astype(np.float64)).astype(np.float32)
    if bias.ndim != 1 or bias.shape != scales.shape or gemm.attributes.get_float("alpha", 1.0) != 1.0:
        return  # a broadcast bias or a scaled product: leave the float bias
    limit = np.iinfo(np.int32).max
    q = np.clip(np.rint(bias / scales), -limit, limit).astype(np.int32)
    prefix = f"{gemm.name}.bias"
    dq = ir.node("DequantizeLinear", [_constant(graph, f"{prefix}.q", q), _constant(graph, f"{prefix}.scale", scales)],
                 {"axis": 0}, name=f"{prefix}.dq")
    dq.outputs[0].name = f"{prefix}.dequantized"
    graph.insert_before(gemm, dq)
    gemm.replace_input_with(2, dq.outputs[0])
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)


def _subtract_from_bias(graph: ir.Graph, node: ir.Node, layer: Layer, shift: np.ndarray) -> None:
    """Fold -shift into the layer's bias: Conv/Gemm's own bias input, or the Add right after a MatMul."""
    name = f"{layer.name}.bias_corrected"
    if layer.op_type in ("Conv", "Gemm"):
        factor = node.attributes.get_float("beta", 1.0) if layer.op_type == "Gemm" else 1.0
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and (bias.const_value is None or bias.const_value.numpy().size != shift.size):
            return  # a computed or broadcast bias: leave it alone
        old = bias.const_value.numpy() if bias is not None else np.zeros(shift.shape, np.float32)
        node.resize_inputs(3)
        node.replace_input_with(2, _constant(graph, name, (old - shift / factor).astype(np.float32)))
        return
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0][0].op_type != "Add" or node.outputs[0].is_graph_output():
        return
    add, index = uses[0]
    other = add.inputs[1 - index]
    if other is None or other.const_value is None or other.const_value.numpy().size != shift.size:
        return
    add.replace_input_with(1 - index, _constant(graph, name, (other.const_value.numpy() - shift).astype(np.float32)))


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


def mean_tensors(layers: list[Layer], policy: Policy) -> dict[str, int]:
    """Inputs whose per-channel means bias correction needs: tensor -> channel axis.

    Conv and Gemm only. MatMul layers read token sequences whose mean is dominated by padding
    positions the model masks out; correcting MiniLM's MatMuls with that mean made its INT4
    weight-only embeddings worse, not better.
    """
    return {
        layer.activation: 1 if layer.op_type == "Conv" else -1
        for layer in layers
        if layer.op_type in ("Conv", "Gemm") and not policy.precision_of(layer.name).is_float
    }
