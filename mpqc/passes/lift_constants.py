"""Weights held in Constant nodes (paddle2onnx and others export them so) become initializers.

A layer is a Conv/Gemm/MatMul whose weight is a constant tensor, and the passes after this one read
constants as initializers. onnx_ir's pass does the lifting; it runs only on models where a layer
reads its weight or bias from a Constant node, so a model that built before keeps its bytes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from mpqc.passes.check_weights import LAYER_OPS


class LiftConstantWeightsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not any(_reads_constant_node(node) for node in model.graph):
            return ir.passes.PassResult(model, False)
        # size_limit=0: small weights and biases (a 1x1 conv's, a bias of 4) are weights all the same.
        return common.LiftConstantsToInitializersPass(size_limit=0)(model)


def _reads_constant_node(node: ir.Node) -> bool:
    if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
        return False
    for value in node.inputs[1:3]:  # weight, and Conv/Gemm's bias
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "Constant" and producer.domain == "":
            return True
    return False
