"""Fold constant scales and shifts that follow a Conv into its weights and bias.

Some networks put a learnable affine x * a + b after every conv (PP-LCNetV3's "learnable affine
blocks", exported as Mul and Add of constants; re-parameterized nets leave the same behind). ONNX
Runtime fuses them into the conv in FP32, but in a QDQ model the conv's output quantizer sits in
between, so the Mul and Add would run as float ops on dequantized tensors and the INT8 model would
pay for work FP32 does not do. Folded, the conv computes the same values and its output quantizer
sees the tensor its readers use.

Only per-tensor or per-output-channel constants fold, and only when the conv's output has no other
reader: (W x + c) * a + b = (a W) x + (a c + b).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mpqc.passes.conv_rewrite import bypass, replace_weights

_STEPS = ("Mul", "Div", "Add", "Sub")


class FoldConvAffinePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "Conv" and node.domain == "" and _fold_chain(model.graph, node):
                modified = True
        return ir.passes.PassResult(model, modified)


def _fold_chain(graph: ir.Graph, conv: ir.Node) -> bool:
    """Fold every elementwise constant op that reads `conv`'s output in turn; True if any folded."""
    weight = conv.inputs[1].const_value if len(conv.inputs) > 1 and conv.inputs[1] is not None else None
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    if weight is None or (bias_value is not None and bias_value.const_value is None):
        return False
    w = weight.numpy().astype(np.float64)
    b = bias_value.const_value.numpy().astype(np.float64) if bias_value is not None else np.zeros(w.shape[0])
    folded_any = False
    while (step := _next_step(conv, w.shape[0], w.ndim)) is not None:
        node, factor, shift = step
        folded_w, folded_b = w * factor.reshape(-1, *([1] * (w.ndim - 1))), b * factor + shift
        if not fits_float32(folded_w, folded_b):
            break  # this op stays where it is rather than leave an infinite weight the model never had
        w, b = folded_w, folded_b
        bypass(graph, conv, node)
        folded_any = True
    if folded_any:
        replace_weights(graph, conv, w.astype(np.float32), b.astype(np.float32), "affine")
    return folded_any


def fits_float32(*arrays: np.ndarray) -> bool:
    """Whether every value stays finite once written as float32 (the weights' type)."""
    with np.errstate(over="ignore"):
        return all(np.all(np.isfinite(a.astype(np.float32))) for a in arrays)


def _next_step(conv: ir.Node, channels: int, rank: int) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """The one op reading the conv's output as y = x * factor + shift per channel, else None."""
    output = conv.outputs[0]
    uses = list(output.uses())
    if output.is_graph_output() or len(uses) != 1:
        return None
    node, index = uses[0]
    if node.domain != "" or len(node.outputs) != 1:
        return None
    step = affine_step(node, index, channels, rank)
    return None if step is None else (node, *step)


def affine_step(node: ir.Node, index: int, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(factor, shift) per channel where `node` computes y = x * factor + shift of its input `index`
    with a per-tensor or per-channel constant as the other input; else None."""
    if node.op_type not in _STEPS or len(node.inputs) != 2:
        return None
    if node.op_type in ("Sub", "Div") and index != 0:
        return None  # c - x and c / x are not affine in x the same way
    constant = per_channel(node.inputs[1 - index], channels, rank)
    if constant is None:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op_type == "Mul":
        step = constant, zeros
    elif node.op_type == "Div":
        with np.errstate(divide="ignore"):  # a zero divisor: refused below
            step = 1.0 / constant, zeros
    else:
        step = ones, constant if node.op_type == "Add" else -constant
    return step if np.all(np.isfinite(step[0])) else None


def per_channel(value: ir.Value | None, channels: int, weight_rank: int) -> np.ndarray | None:
    """A constant as one float64 number per output channel, when it is per-tensor or per-channel
    along the channel axis of an NC... activation; else None."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if not np.issubdtype(array.dtype, np.floating) or array.ndim > weight_rank:
        return None
    if array.size == 1:
        return np.full(channels, float(array.reshape(())), dtype=np.float64)
    # Broadcast against (N, C, spatial...): the constant must vary along C only.
    shape = (1,) * (weight_rank - array.ndim) + array.shape
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return array.reshape(channels).astype(np.float64)
