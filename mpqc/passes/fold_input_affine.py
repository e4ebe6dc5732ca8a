"""Fold constant scales and shifts that a Conv reads into its weights and bias.

PP-LCNetV3's learnable affine blocks also follow the activation: conv -> hard-swish -> x * a + b ->
conv. The affine cannot fold into the conv before it (hard-swish is in between), but it folds into
the conv after it: W (a x + b) + c = (W a) x + (W b + c), the shift summed over the kernel. ONNX
Runtime does not do this fold, so in FP32 and in a QDQ model alike the Mul and Add each cost a pass
over the tensor; folded, the next conv's input quantizer reads the activation's output directly.

The shift folds exactly only where the conv pads nothing (a padded border would see b where the
original sees 0). A padded conv takes the scale, and one Add of b / a is left before it:
a x + b = a (x + b / a), and the padded zeros stay zeros under a. Only per-tensor or
per-input-channel constants fold, and only a chain whose values nothing else reads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mpqc.passes.constants import DEFAULT_DOMAIN
from mpqc.passes.conv_rewrite import replace_weights
from mpqc.passes.fold_affine import affine_step, fits_float32


class FoldConvInputAffinePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "Conv" and node.domain in DEFAULT_DOMAIN and _fold_into(model.graph, node):
                modified = True
        return ir.passes.PassResult(model, modified)


def _fold_into(graph: ir.Graph, conv: ir.Node) -> bool:
    weight = conv.inputs[1].const_value if len(conv.inputs) > 1 and conv.inputs[1] is not None else None
    bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
    if weight is None or (bias_value is not None and bias_value.const_value is None):
        return False
    w = weight.numpy().astype(np.float64)
    if w.ndim < 3:
        return False
    groups = conv.attributes.get_int("group", 1)
    in_channels = w.shape[1] * groups
    chain, source = _chain_before(conv, in_channels, w.ndim)
    if not chain:
        return False
    scale, shift = np.ones(in_channels), np.zeros(in_channels)
    for _, factor, offset in chain:  # first op first: y = x * factor + offset, composed in order
        scale, shift = scale * factor, shift * factor + offset
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return False
    leftover = None  # the shift a padded conv cannot take
    if np.any(shift != 0) and _pads_anything(conv):
        if np.any(scale == 0) or (len(chain) == 1 and chain[0][0].op_type in ("Add", "Sub")):
            return False  # a zero scale cannot carry the shift; a lone shift leaves nothing to gain
        # a x + b = a (x + b / a), and the padded zeros stay zeros under a: one Add is left.
        leftover, shift = shift / scale, np.zeros(in_channels)
    # The input channel each weight entry reads: group g of the outputs reads channels g*(C/g) ...
    per_group_out = w.shape[0] // groups
    channel = (np.arange(w.shape[0])[:, None] // per_group_out) * w.shape[1] + np.arange(w.shape[1])[None, :]
    b = bias_value.const_value.numpy().astype(np.float64) if bias_value is not None else np.zeros(w.shape[0])
    spatial = tuple(range(2, w.ndim))
    b = b + (w.sum(axis=spatial) * shift[channel]).sum(axis=1)
    w = w * scale[channel].reshape(*channel.shape, *([1] * len(spatial)))
    if not fits_float32(w, b):
        return False  # the product overflows float32: the model stays as it was, not a broken weight
    if leftover is not None:
        uniform = np.all(leftover == leftover[0])
        constant = np.asarray(leftover[0]) if uniform else leftover.reshape((1, in_channels) + (1,) * (w.ndim - 2))
        offset = ir.Value(name=f"{conv.name}.input_shift", const_value=ir.tensor(constant.astype(np.float32)))
        graph.register_initializer(offset)
        add = ir.Node("", "Add", [source, offset], name=f"{conv.name}.input_shift_add")
        graph.insert_before(conv, add)
        add.outputs[0].shape, add.outputs[0].type = conv.inputs[0].shape, conv.inputs[0].type
        source = add.outputs[0]
    conv.replace_input_with(0, source)
    graph.remove([node for node, _, _ in reversed(chain)], safe=True)
    replace_weights(graph, conv, w.astype(np.float32), b.astype(np.float32), "input_affine")
    return True


def _chain_before(conv: ir.Node, channels: int, rank: int) -> tuple[list[tuple[ir.Node, np.ndarray, np.ndarray]], ir.Value]:
    """The affine ops computing the conv's input, first one first (each value read only by the next),
    and the value the first one reads."""
    chain = []
    value = conv.inputs[0]
    while value is not None and not value.is_graph_output() and len(value.uses()) == 1:
        node = value.producer()
        if node is None or node.domain not in DEFAULT_DOMAIN or len(node.inputs) != 2:
            break
        constants = [index for index in (0, 1) if node.inputs[index] is not None and node.inputs[index].const_value is not None]
        if len(constants) != 1:
            break
        data = 1 - constants[0]
        step = affine_step(node, data, channels, rank)
        if step is None:
            break
        chain.append((node, *step))
        value = node.inputs[data]
    return list(reversed(chain)), value


def _pads_anything(conv: ir.Node) -> bool:
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return True  # SAME_UPPER/SAME_LOWER pad wherever the kernel is larger than 1
    return auto_pad == "NOTSET" and any(conv.attributes.get_ints("pads", []) or [])
