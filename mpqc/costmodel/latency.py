"""What a policy costs: predicted latency from a measured table, BitOps and weight bytes.

The ILP (mpqc.search.ilp) minimises loss under these costs; profiling and validation fit and check them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from mpqc.passes.signatures import Signature
from mpqc.precision import Precision, precision


def quantizes_activations(name: str) -> bool:
    return precision(name).quantizes_activations


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Predicted latency of a policy: per-layer times, a cost per graph edge, a fixed overhead."""

    layer_ms: Mapping[tuple[str, str], float]  # (layer, precision) -> ms
    edges: tuple[tuple[str, str], ...] = ()  # (producer layer, consumer layer), adjacent in the graph
    # (producer quantizes activations, consumer quantizes activations) -> ms per edge; missing keys cost 0
    boundary_ms: Mapping[tuple[bool, bool], float] = dataclasses.field(default_factory=dict)
    overhead_ms: float = 0.0
    # Costs of one particular edge by kind, on top of boundary_ms (e.g. an INT8 layer that loses its
    # fused kernel when the layer reading it stays float).
    edge_ms: Mapping[tuple[str, str], Mapping[tuple[bool, bool], float]] = dataclasses.field(default_factory=dict)

    def boundary(self, producer_quantizes: bool, consumer_quantizes: bool, edge: tuple[str, str] | None = None) -> float:
        kind = (producer_quantizes, consumer_quantizes)
        extra = self.edge_ms.get(edge, {}).get(kind, 0.0) if edge is not None else 0.0
        return float(self.boundary_ms.get(kind, 0.0)) + float(extra)

    def predict(self, policy: Mapping[str, str]) -> float:
        total = float(self.overhead_ms) + sum(float(self.layer_ms[(layer, p)]) for layer, p in policy.items())
        for producer, consumer in self.edges:
            total += self.boundary(
                quantizes_activations(policy[producer]), quantizes_activations(policy[consumer]), (producer, consumer)
            )
        return total


def bitops_and_size(
    signature: Signature, precision_or_name: Precision | str, symbolic: Mapping[str, int] | None = None
) -> tuple[float, float]:
    """(BitOps per sample, weight bytes) of one layer at one precision.

    BitOps = MACs x weight bits x activation bits (LIMPQ's measure); float counts as 32 bits and a
    weight-only precision by its name (w4a16: 4 x 16). Symbolic dims count as 1 unless `symbolic`
    gives a value (the batch is never counted: the numbers are per sample).
    """
    p = precision(precision_or_name) if isinstance(precision_or_name, str) else precision_or_name
    weight_bits, activation_bits = _bits(p)
    params = int(np.prod(signature.weight_shape))
    if signature.op_type == "Conv":
        if len(signature.output_shape) < 3:
            raise ValueError(f"Conv signature without an output shape: {signature.key()}")
        macs = params * _count(signature.output_shape[2:], symbolic)
    else:
        # Gemm/MatMul weights hold K x N: each input row costs K*N MACs; leading dims after the batch are rows.
        macs = params * _count(signature.input_shape[1:-1], symbolic)
    return float(macs * weight_bits * activation_bits), params * weight_bits / 8.0


def _bits(p: Precision) -> tuple[int, int]:
    weight = p.weight_bits if p.weight_bits is not None else 32
    if p.activation_bits is not None:
        return weight, p.activation_bits
    if p.is_float:
        return weight, 32
    # Weight-only: activations run in the float type the name states ("w4a16"), else float32.
    suffix = p.name.rpartition("a")[2]
    return weight, int(suffix) if suffix.isdigit() else 32


def _count(dims, symbolic: Mapping[str, int] | None) -> int:
    total = 1
    for d in dims:
        total *= d if isinstance(d, int) else (symbolic or {}).get(d, 1)
    return total
