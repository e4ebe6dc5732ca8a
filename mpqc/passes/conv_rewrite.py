"""Edits shared by the passes that fold an op into the Conv before it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def replace_weights(graph: ir.Graph, conv: ir.Node, weight: np.ndarray, bias: np.ndarray, suffix: str) -> None:
    """Give `conv` new constant weight and bias tensors, named after its weight plus `suffix`."""
    name = conv.inputs[1].name or f"{conv.name}.weight"
    new_w = ir.Value(name=f"{name}.{suffix}", const_value=ir.tensor(weight))
    new_b = ir.Value(name=f"{name}.{suffix}_bias", const_value=ir.tensor(bias))
    graph.register_initializer(new_w)
    graph.register_initializer(new_b)
    conv.resize_inputs(3)
    conv.replace_input_with(1, new_w)
    conv.replace_input_with(2, new_b)


def bypass(graph: ir.Graph, conv: ir.Node, folded: ir.Node) -> None:
    """Remove `folded`, which reads only `conv`'s output: its readers (and the graph output, if it is
    one) read the conv directly, and a graph output keeps the name users feed and fetch by."""
    output, replaced = conv.outputs[0], folded.outputs[0]
    output.shape, output.type = replaced.shape or output.shape, replaced.type or output.type
    name = replaced.name if replaced.is_graph_output() else output.name
    ir.convenience.replace_all_uses_with(replaced, output, replace_graph_outputs=True)
    graph.remove(folded, safe=True)
    output.name = name
