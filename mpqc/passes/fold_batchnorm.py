"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

Exports from torch already fold most of them; ONNX files from other tools often do not, and a
BatchNorm left between a Conv and its quantizer would be quantized as a separate (float) op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


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

        name = conv.inputs[1].name or f"{conv.name}.weight"
        new_w = ir.Value(name=f"{name}.bnfold", const_value=ir.tensor(folded_w))
        new_b = ir.Value(name=f"{name}.bnfold_bias", const_value=ir.tensor(folded_b))
        graph.register_initializer(new_w)
        graph.register_initializer(new_b)
        conv.resize_inputs(3)
        conv.replace_input_with(1, new_w)
        conv.replace_input_with(2, new_b)
        # The BN's consumers (and the graph output, if it is one) now read the Conv directly.
        bn_out, conv_out = bn.outputs[0], conv.outputs[0]
        conv_out.shape, conv_out.type = bn_out.shape or conv_out.shape, bn_out.type or conv_out.type
        output_name = bn_out.name if bn_out.is_graph_output() else conv_out.name
        ir.convenience.replace_all_uses_with(bn_out, conv_out, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        conv_out.name = output_name  # a graph output keeps the name users feed/fetch by
        return True
