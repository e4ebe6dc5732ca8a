"""Valid ONNX that mpqc still cannot build: refused at load, with the reason, instead of failing later.

Every build feeds the model batches of samples along axis 0 (proxy data, calibration, latency), in
ONNX Runtime; a model it cannot feed or run that way is refused here.
"""

from __future__ import annotations

import math

import onnx

from mpqc.errors import MpqcError

MAX_INPUT_ELEMENTS = 2**31  # per sample; feeding more is no model mpqc can calibrate or time
# Domains ONNX Runtime's CPU provider implements (mpqc calibrates and measures there).
RUNTIME_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def check_input_sizes(model: onnx.ModelProto, origin: str) -> None:
    """Refuse declared input shapes no input array could have, before anything allocates one."""
    for info in _inputs(model):
        # Symbolic dims count as 1; so do negative ones, which old exporters wrote for "any" and ONNX Runtime reads so.
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else 1 for d in info.type.tensor_type.shape.dim]
        if 0 in dims:
            raise MpqcError(f"input '{info.name}' of '{origin}' declares shape {_shape(info)}: a zero dimension leaves no "
                            "data to feed; fix the export's input shape")
        elements = math.prod(dims)
        if elements > MAX_INPUT_ELEMENTS:
            raise MpqcError(f"input '{info.name}' of '{origin}' declares shape {_shape(info)}, {elements:.3g} elements per sample; "
                            f"mpqc refuses more than {MAX_INPUT_ELEMENTS}: fix the export's input shape")


def check_supported(model: onnx.ModelProto, origin: str) -> None:
    inputs = _inputs(model)
    if not inputs:
        raise MpqcError(f"'{origin}' has no graph inputs: it computes constants, there is nothing to calibrate")
    if not model.graph.output:
        raise MpqcError(f"'{origin}' has no graph outputs: it computes nothing to quantize")
    for info in inputs:
        if not info.type.HasField("tensor_type"):
            raise MpqcError(f"input '{info.name}' of '{origin}' is not a tensor; mpqc feeds only tensor inputs")
        if not info.type.tensor_type.HasField("shape"):
            raise MpqcError(f"input '{info.name}' of '{origin}' declares no shape; mpqc needs at least its rank: "
                            "re-export with input shapes")
        if not info.type.tensor_type.shape.dim:
            raise MpqcError(f"input '{info.name}' of '{origin}' is a scalar (rank 0); mpqc feeds every input in batches "
                            "along axis 0: give it a batch axis")
    functions = {(f.domain, f.name) for f in model.functions}  # model-local functions ORT inlines
    for node in _nodes(model.graph):
        if node.domain not in RUNTIME_DOMAINS and (node.domain, node.op_type) not in functions:
            raise MpqcError(f"node '{node.name}' of '{origin}' is op '{node.op_type}' of domain '{node.domain}', which "
                            "ONNX Runtime (where mpqc calibrates and measures) does not implement; export without custom ops")


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _nodes(graph: onnx.GraphProto):
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _nodes(subgraph)


def _shape(info: onnx.ValueInfoProto) -> str:
    dims = info.type.tensor_type.shape.dim
    return "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
