"""Decomposed hard-swish becomes one HardSwish op.

Exporters write hard-swish as x * Clip(x + 3, 0, 6) / 6 (or with the / 6 before the product, or as
x * HardSigmoid(x) with alpha 1/6). ONNX Runtime's CPU optimizer fuses none of these forms, so each
runs as four elementwise passes over the tensor; PP-LCNetV3 (PP-OCRv4's detector) has one after
nearly every conv, and in a QDQ model they run on the dequantized conv outputs. One HardSwish op
(ONNX opset 14) computes the same function, x * max(0, min(1, x / 6 + 1/2)), in one pass (the float
results agree to rounding). The live-range cut (mpqc.lower.live_ranges) knows the HardSwish op too.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from mpqc.passes.constants import DEFAULT_DOMAIN, clip_limits, scalar

_HARD_SWISH_OPSET = 14  # the first ONNX opset with HardSwish


class FuseHardSwishPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is None or opset < _HARD_SWISH_OPSET:
            return ir.passes.PassResult(model, False)
        modified = False
        for node in list(model.graph):
            if node.graph is None:
                continue  # removed as part of an earlier match
            match = _match(node)
            if match is not None:
                _replace(model.graph, *match)
                modified = True
        return ir.passes.PassResult(model, modified)


def _match(node: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """(x, the nodes computing hard-swish of x, last one last) for a match starting at `node`."""
    if node.domain not in DEFAULT_DOMAIN:
        return None
    if node.op_type == "HardSigmoid":
        alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
        if not (math.isclose(alpha, 1 / 6, rel_tol=1e-6) and math.isclose(beta, 0.5, rel_tol=1e-6)):
            return None
        x = node.inputs[0]
        product = _sole_reader(node, "Mul")
        return (x, [node, product]) if product is not None and _other_input(product, node.outputs[0]) is x else None
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for index in (0, 1):
        if scalar(node.inputs[1 - index]) == 3.0:
            x = node.inputs[index]
            break
    else:
        return None
    clip = _sole_reader(node, "Clip")
    if clip is None or clip.inputs[0] is not node.outputs[0] or clip_limits(clip) != (0.0, 6.0):
        return None
    after = _sole_reader(clip, "Mul", "Div")
    if after is None:
        return None
    if after.op_type == "Mul" and _other_input(after, clip.outputs[0]) is x:  # x * clip, then / 6
        scaled = _sole_reader(after, "Mul", "Div")
        return (x, [node, clip, after, scaled]) if scaled is not None and _is_sixth(scaled, after.outputs[0]) else None
    if _is_sixth(after, clip.outputs[0]):  # clip / 6, then x * it
        product = _sole_reader(after, "Mul")
        return (x, [node, clip, after, product]) if product is not None and _other_input(product, after.outputs[0]) is x else None
    return None


def _sole_reader(node: ir.Node, *op_types: str) -> ir.Node | None:
    """The one default-domain node of `op_types` that reads `node`'s only output, if it is its only reader."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(node.outputs) != 1 or output.is_graph_output() or len(uses) != 1:
        return None
    reader = uses[0][0]
    if reader.op_type not in op_types or reader.domain not in DEFAULT_DOMAIN:
        return None
    return reader if reader.op_type == "Clip" or len(reader.inputs) == 2 else None


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    first, second = node.inputs
    return second if first is value else first if second is value else None


def _is_sixth(node: ir.Node, value: ir.Value) -> bool:
    """`node` computes value / 6 (Div by 6, or Mul by 1/6 at float32 precision)."""
    if node.op_type == "Div":
        return node.inputs[0] is value and scalar(node.inputs[1]) == 6.0
    constant = scalar(_other_input(node, value))
    return constant is not None and math.isclose(constant, 1 / 6, rel_tol=1e-6)


def _replace(graph: ir.Graph, x: ir.Value, nodes: list[ir.Node]) -> None:
    last = nodes[-1]
    old = last.outputs[0]
    fused = ir.Node("", "HardSwish", [x], name=f"{last.name}.hard_swish" if last.name else None)
    graph.insert_before(nodes[0], fused)
    result = fused.outputs[0]
    result.shape, result.type = old.shape, old.type
    name = old.name
    ir.convenience.replace_all_uses_with(old, result, replace_graph_outputs=True)
    graph.remove(nodes, safe=True)
    result.name = name  # readers and a graph output keep the tensor's name
