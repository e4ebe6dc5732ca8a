"""Random mixed policies over what a target deploys, respecting tie groups (validation and fitting)."""

from __future__ import annotations

import numpy as np

from mpqc.passes.analysis import Analysis
from mpqc.policy import Policy
from mpqc.targets import Target


def uniform_policies(analysis: Analysis, target: Target) -> list[Policy]:
    """One policy per precision the target deploys: each layer takes it where it can, else fp32."""
    names = sorted({p.name for layer in analysis.layers for p in target.precisions_for(layer.op_type)})
    policies = []
    for name in names:
        chosen = tuple(
            (layer.name, name if name in [p.name for p in target.precisions_for(layer.op_type)] else "fp32")
            for layer in analysis.layers
        )
        policies.append(Policy(chosen, f"uniform:{name}"))
    return policies


def random_policy(analysis: Analysis, target: Target, rng: np.random.Generator, tag: str) -> Policy:
    """Each tie group (or lone layer) draws one precision that all its members can run.

    The share of quantized layers is itself drawn per policy (uniform in [0, 1]), so the set spans
    isolated quantized layers in a float model, dense mixes and nearly uniform ones, as searches do.
    """
    density = rng.uniform()
    groups = {name: group for group in analysis.ties for name in group}
    chosen: dict[str, str] = {}
    by_name = {layer.name: layer for layer in analysis.layers}
    for layer in analysis.layers:
        if layer.name in chosen:
            continue
        members = groups.get(layer.name, (layer.name,))
        common = set.intersection(*({p.name for p in target.precisions_for(by_name[m].op_type)} for m in members))
        quantized = sorted(common - {"fp32"})
        if quantized and rng.uniform() < density:
            pick = quantized[rng.integers(len(quantized))]
        else:
            pick = "fp32" if "fp32" in common else sorted(common)[0]
        chosen.update({member: pick for member in members})
    return Policy(tuple((layer.name, chosen[layer.name]) for layer in analysis.layers), tag)
