"""Weights stored in another type or behind an Identity become plain initializers.

Exporters and converters write a layer's weight as Cast(float16 initializer), Identity(initializer)
or a chain of the two (float16-stored models, graphs from tf2onnx and from ONNX's own converters).
The weight is constant all the same, but only an initializer is a layer's weight to the passes
after this one: each such weight and bias gets a new initializer holding the computed value (the
cast done as numpy does it). It runs only where a layer reads one, so other models keep their bytes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mpqc.passes.check_weights import LAYER_OPS

PASS_THROUGH = ("Identity", "Cast")


class FoldWeightCastsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        for node in list(graph):
            if node.op_type not in LAYER_OPS or node.domain not in ("", "ai.onnx"):
                continue
            for index in (1, 2):  # weight, and Conv/Gemm's bias
                if index >= len(node.inputs) or node.inputs[index] is None:
                    continue
                array = _constant_through_casts(node.inputs[index])
                if array is None:
                    continue
                folded = ir.Value(name=f"{node.inputs[index].name}.folded", const_value=ir.tensor(array))
                graph.register_initializer(folded)
                node.replace_input_with(index, folded)
                modified = True
        return ir.passes.PassResult(model, modified)


def _constant_through_casts(value: ir.Value) -> np.ndarray | None:
    """The value of `value` where it is an initializer behind at least one Identity/Cast, else None."""
    producer = value.producer()
    if producer is None or producer.op_type not in PASS_THROUGH or producer.domain not in ("", "ai.onnx"):
        return None
    source = producer.inputs[0] if producer.inputs else None
    if source is None:
        return None
    if source.is_graph_input():
        return None  # an initializer a user may feed: not a constant
    array = source.const_value.numpy() if source.producer() is None and source.const_value is not None \
        else _constant_through_casts(source)
    if array is None:
        return None
    if producer.op_type == "Cast":
        target = producer.attributes.get("to")
        if target is None:
            return None
        dtype = ir.DataType(target.as_int())
        if not dtype.is_floating_point() or dtype.numpy() is None:
            return None  # casts to integers or to types numpy lacks: leave the graph as it is
        array = np.asarray(array).astype(dtype.numpy())
    return np.asarray(array)
