"""Which quantizable layers feed which: the edges where precision boundaries cost time."""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir

from mpqc.passes.layers import Layer


def layer_edges(model: ir.Model, layers: list[Layer]) -> tuple[tuple[str, str], ...]:
    """(producer, consumer) pairs of layers connected through non-layer ops only, in layer order."""
    graph = nx.DiGraph()
    for node in model.graph:
        for output in node.outputs:
            for user, _ in output.uses():
                graph.add_edge(node.name, user.name)
    names = {layer.name for layer in layers}
    order = {layer.name: i for i, layer in enumerate(layers)}
    edges = set()
    for layer in layers:
        if layer.name not in graph:
            continue
        # Walk forward from the layer, stopping at the next layers: those are its consumers.
        frontier, seen = list(graph.successors(layer.name)), set()
        while frontier:
            current = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in names:
                edges.add((layer.name, current))
            else:
                frontier.extend(graph.successors(current))
    return tuple(sorted(edges, key=lambda e: (order[e[0]], order[e[1]])))
