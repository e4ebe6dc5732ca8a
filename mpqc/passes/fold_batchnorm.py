"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

Exports from torch already fold most of them; ONNX files from other tools often do not, and a
BatchNorm left between a Conv and its quantizer would be quantized as a separate (float) op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mpqc.passes.conv_rewrite import bypass, replace_weights


class FoldBatchNormPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "BatchNormalization" and node.domain == "" and self._fold(model.graph, node):
                modified = True
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _fold(graph: ir.Graph, bn: ir.Node) -> bool:
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type != "Conv" or len(bn.outputs) != 1 or len(conv.outputs[0].uses()) != 1:
            return False
        params = [v.const_value if v is not None else None for v in bn.inputs[1:5]]
        weight = conv.inputs[1].const_value
        bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        if weight is None or any(p is None for p in params):
            return False
        if bias_value is not None and bias_value.const_value is None:
            return False
        scale, shift, mean, var = (p.numpy().astype(np.float64) for p in params)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        factor = scale / np.sqrt(var + eps)
        w = weight.numpy().astype(np.float64)
        b = bias_value.const_value.numpy().astype(np.float64) if bias_value is not None else np.zeros_like(mean)
        folded_w = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        folded_b = ((b - mean) * factor + shift).astype(np.float32)

        replace_weights(graph, conv, folded_w, folded_b, "bnfold")
        bypass(graph, conv, bn)
        return True
