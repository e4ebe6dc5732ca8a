"""Tie groups: layers that must share a precision.

Layers that read the same activation tensor share its one Q/DQ pair (one scale, one type), and
layers that share a weight tensor share its quantized copy; either way they must agree. The groups
are the connected components of a graph with an edge per shared tensor.
"""

from __future__ import annotations

import networkx as nx

from mpqc.passes.layers import Layer


def tie_groups(layers: list[Layer]) -> list[tuple[str, ...]]:
    """Groups of two or more tied layer names, in layer order (deterministic)."""
    graph = nx.Graph()
    order = {layer.name: i for i, layer in enumerate(layers)}
    graph.add_nodes_from(order)
    by_tensor: dict[str, list[str]] = {}
    for layer in layers:
        by_tensor.setdefault("a:" + layer.activation, []).append(layer.name)
        by_tensor.setdefault("w:" + layer.weight, []).append(layer.name)
    for names in by_tensor.values():
        graph.add_edges_from(zip(names, names[1:]))
    groups = [tuple(sorted(c, key=order.get)) for c in nx.connected_components(graph) if len(c) > 1]
    return sorted(groups, key=lambda g: order[g[0]])
