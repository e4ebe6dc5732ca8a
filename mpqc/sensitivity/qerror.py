"""Training-free sensitivity: how far a layer's output moves when that layer alone is quantized.

Each layer is recomputed in torch on the inputs the float model really feeds it, with its weight
quantized as the lowering quantizes it (mpqc.lower.numerics: per output channel, or block-wise along
the reduction axis for INT4 weight-only; an INT8 Gemm's bias rounded to INT32 where the target
stores it so) and, where the precision quantizes activations, its input
fake-quantized per tensor over the range observed on the same samples. The score is the output's
MSE divided by the output's mean square, so layers of any scale compare; fp32 scores 0.

Memory stays flat in the number of samples: the float model runs once for the activation ranges
and once more, batch by batch, for the errors, rather than holding every layer's tensors at once
(EfficientNet-Lite0 needs 1.7 GB for that at 32 samples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.nn import functional as F

from mpqc import progress
from mpqc.calibrate.ranges import calibrate, run_tensors
from mpqc.lower import numerics
from mpqc.passes.layers import Layer
from mpqc.precision import Precision, precision
from mpqc.targets import Target

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LayerOp:
    """A Conv, Gemm or MatMul node as a torch function of (input, weight), bias and attributes included."""

    def __init__(self, node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]):
        self.op_type = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        # A bias computed at run time cannot be replayed here; callers then recompute the float
        # output too, so the bias cancels out of the error (`has_full_bias` tells them).
        self.has_full_bias = bias_name is None or bias_name in constants
        self.bias = torch.from_numpy(numpy_helper.to_array(constants[bias_name]).astype(np.float32)) if (
            bias_name is not None and bias_name in constants) else None
        self.alpha, self.beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        self.trans_b = bool(attrs.get("transB", 0))
        self.strides = tuple(attrs.get("strides", ()))
        self.dilations = tuple(attrs.get("dilations", ()))
        self.pads = tuple(attrs.get("pads", ()))
        self.groups = int(attrs.get("group", 1))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        self.auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, gemm_bias: torch.Tensor | None = None) -> torch.Tensor:
        """`gemm_bias`: a Gemm's bias as the lowering stored it (beta folded in), instead of its own."""
        if self.op_type == "Conv":
            return self._conv(x, weight)
        if self.op_type == "MatMul":
            return torch.matmul(x, weight)
        y = torch.matmul(x, weight.T if self.trans_b else weight)
        if self.alpha != 1.0:
            y = y * self.alpha
        if gemm_bias is not None:
            return y + gemm_bias
        return y if self.bias is None else y + self.beta * self.bias

    def int32_bias(self, input_scale: np.float32, weight_scales: np.ndarray) -> torch.Tensor | None:
        """The bias an INT8 Gemm gets on targets with `int32_gemm_bias` (mpqc.lower.qdq): rounded to
        INT32 at input scale x weight scale; None where the lowering leaves the float bias."""
        if self.op_type != "Gemm" or self.bias is None or self.alpha != 1.0:
            return None
        bias = self.bias.numpy().astype(np.float64) * self.beta
        scales = (np.float64(input_scale) * weight_scales.astype(np.float64)).astype(np.float32)
        if bias.ndim != 1 or bias.shape != scales.shape:
            return None
        limit = np.iinfo(np.int32).max
        q = np.clip(np.rint(bias / scales), -limit, limit).astype(np.int32)
        return torch.from_numpy((q.astype(np.float32) * scales).astype(np.float32))

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        spatial = weight.dim() - 2
        strides = self.strides or (1,) * spatial
        dilations = self.dilations or (1,) * spatial
        begin, end = self._padding(tuple(x.shape[2:]), tuple(weight.shape[2:]), strides, dilations)
        padding = begin
        if begin != end:
            # torch pads both sides alike; ONNX pads may differ (TF "same" with a stride), so pad first.
            x = F.pad(x, [v for d in reversed(range(spatial)) for v in (begin[d], end[d])])
            padding = (0,) * spatial
        return _CONVS[spatial](x, weight, self.bias, strides, padding, dilations, self.groups)

    def _padding(self, size, kernel, strides, dilations) -> tuple[tuple[int, ...], tuple[int, ...]]:
        spatial = len(kernel)
        if self.auto_pad == "VALID":
            return (0,) * spatial, (0,) * spatial
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for n, k, s, d in zip(size, kernel, strides, dilations):
                total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                small, large = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else large)
                end.append(large if self.auto_pad == "SAME_UPPER" else small)
            return tuple(begin), tuple(end)
        pads = self.pads or (0,) * (2 * spatial)
        return tuple(pads[:spatial]), tuple(pads[spatial:])


def quantized_weight(weight: np.ndarray, layer: Layer, p: Precision, block_size: int) -> np.ndarray:
    """The weight the lowered model computes with: integer values times their scales, as float32."""
    if p.weight_granularity == "block":
        q, scales = numerics.quantize_weight(weight, p.weight_bits, layer.channel_axis, layer.reduction_axis, block_size)
        return (q * numerics.expand_scales(scales, weight.shape, layer.reduction_axis, block_size)).astype(np.float32)
    q, scales = numerics.quantize_weight(weight, p.weight_bits, layer.channel_axis)
    return (q * numerics.expand_scales(scales, weight.shape, layer.channel_axis, None)).astype(np.float32)


def fake_quantize_activation(x: torch.Tensor, scale: np.float32, zero_point: np.ndarray) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear: round half to even, saturate to the integer type."""
    low, high = (-128, 127) if zero_point.dtype == np.int8 else (0, 255)
    zero = float(zero_point)
    step = torch.tensor(scale, dtype=torch.float32)
    # Divide (not multiply by 1/scale) as QuantizeLinear does; in place, on the one fresh copy.
    q = torch.div(x, step)
    return q.round_().add_(zero).clamp_(low, high).sub_(zero).mul_(step)


def qerror_scores(
    float_model: onnx.ModelProto,
    layers: list[Layer],
    candidates: Mapping[str, Sequence[str]],
    feeds: dict[str, np.ndarray],
    target: Target,
    samples: int = 32,
    *,
    calibration: str = "minmax",
    percentile: float = 99.99,
    batch_size: int = 8,
) -> dict[tuple[str, str], float]:
    """(layer, precision) -> MSE(quantized output, float output) / mean(float output^2) on `samples` samples."""
    feeds = {name: array[:samples] for name, array in feeds.items()}
    constants = _constants(float_model)
    nodes = {node.name: node for node in float_model.graph.node}
    scores: dict[tuple[str, str], float] = {}
    plans = []
    for layer in layers:
        chosen = [precision(name) for name in candidates.get(layer.name, ())]
        for p in chosen:
            if p.is_float and not p.quantizes_activations:
                scores[(layer.name, p.name)] = 0.0  # the float model itself
        quantized = [p for p in chosen if not (p.is_float and not p.quantizes_activations)]
        if quantized:
            plans.append(_Plan(layer, LayerOp(nodes[layer.name], constants), constants[layer.weight], quantized, target))
    if not plans:
        return scores

    inputs = list(dict.fromkeys(plan.layer.activation for plan in plans if plan.quantizes_input))
    ranges = calibrate(float_model, inputs, feeds, calibration, percentile, batch_size, target.activation_type)
    for plan in plans:
        if plan.quantizes_input:
            plan.set_activation(numerics.activation_params(*ranges[plan.layer.activation], target.activation_type))

    tensors = list(dict.fromkeys(name for plan in plans for name in (plan.layer.activation, plan.layer.output)))
    with torch.inference_mode():
        count = len(next(iter(feeds.values())))
        for values in progress.bar(run_tensors(float_model, tensors, feeds, batch_size), f"qerror of {len(plans)} layers",
                                   total=-(-count // batch_size), unit="batch"):
            for plan in plans:
                plan.accumulate(values)
    for plan in plans:
        scores |= plan.scores()
    return {(layer.name, name): scores[(layer.name, name)] for layer in layers for name in candidates.get(layer.name, ())}


class _Plan:
    """One layer's quantized weights and running sums of squared error and of output energy."""

    def __init__(self, layer: Layer, op: LayerOp, weight: onnx.TensorProto, chosen: list[Precision], target: Target):
        self.layer, self.op, self.chosen = layer, op, chosen
        float_weight = numpy_helper.to_array(weight).astype(np.float32)
        self.float_weight = torch.from_numpy(float_weight)
        self.weights = {}
        # INT8 Gemms whose bias the lowering stores as INT32: their per-channel weight scales.
        self.int32_bias_scales = {
            p.name: numerics.quantize_weight(float_weight, 8, layer.channel_axis)[1] for p in chosen
            if target.int32_gemm_bias and op.op_type == "Gemm" and p.weight_bits == 8 and p.quantizes_activations
            and p.weight_granularity != "block"}
        self.gemm_biases: dict[str, torch.Tensor | None] = {}
        for p in chosen:
            if p.is_float:
                self.weights[p.name] = self.float_weight
            elif p.weight_granularity == "block" and op.op_type == "Gemm" and op.alpha != 1.0:
                # The lowering folds alpha into the weight before quantizing it block-wise.
                scaled = quantized_weight(float_weight * op.alpha, layer, p, target.int4_block_size)
                self.weights[p.name] = torch.from_numpy(scaled / op.alpha)
            else:
                self.weights[p.name] = torch.from_numpy(quantized_weight(float_weight, layer, p, target.int4_block_size))
        self.quantizes_input = any(p.quantizes_activations for p in chosen)
        self.activation: tuple[np.float32, np.ndarray] | None = None
        self.error = dict.fromkeys((p.name for p in chosen), 0.0)
        self.energy = 0.0
        self.count = 0

    def set_activation(self, params: tuple[np.float32, np.ndarray]) -> None:
        self.activation = params
        self.gemm_biases = {name: self.op.int32_bias(params[0], scales) for name, scales in self.int32_bias_scales.items()}

    def accumulate(self, values: dict[str, np.ndarray]) -> None:
        x = torch.from_numpy(values[self.layer.activation])
        reference = torch.from_numpy(values[self.layer.output]) if self.op.has_full_bias else self.op(x, self.float_weight)
        self.energy += _sum_of_squares(reference)
        self.count += reference.numel()
        # Every activation-quantizing precision reads the same per-tensor quantized input.
        quantized_x = fake_quantize_activation(x, *self.activation) if self.quantizes_input else None
        for p in self.chosen:
            y = self.op(quantized_x if p.quantizes_activations else x, self.weights[p.name], self.gemm_biases.get(p.name))
            self.error[p.name] += _sum_of_squares(y.sub_(reference))

    def scores(self) -> dict[tuple[str, str], float]:
        # An all-zero output (a dead layer) has no scale to normalise by; any error there counts in full.
        energy = max(self.energy, self.count * 1e-30)
        return {(self.layer.name, name): error / energy for name, error in self.error.items()}


def _sum_of_squares(t: torch.Tensor) -> float:
    # A BLAS dot: several times faster than squaring into a float64 copy, and its blocked float32
    # accumulation stays within ~1e-5 relative on ten-million-element tensors.
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant(value=tensor) outputs by name, still serialized (converted on use)."""
    found = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = attribute.t
    return found


def context_scores(context) -> dict[tuple[str, str], float]:
    """The `qerror` method on a SensitivityContext (mpqc.sensitivity.methods)."""
    return qerror_scores(context.float_model, context.layers, context.candidates, context.feeds, context.target)
