"""`mpqc build --method`: the sensitivity methods by name, each (SensitivityContext) -> scores."""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

from mpqc.errors import MpqcError

if TYPE_CHECKING:  # the CLI reads METHODS for --method's choices: keep importing this module cheap
    from mpqc.sensitivity.context import SensitivityContext

# name -> (module, function). Imported on use: the trained methods pull in more of torch.
METHODS = {
    "seam": ("mpqc.sensitivity.indicators", "seam_scores"),
    "limpq": ("mpqc.sensitivity.indicators", "limpq_scores"),
    "hawq": ("mpqc.sensitivity.hawq", "hawq_scores"),
    "qerror": ("mpqc.sensitivity.qerror", "context_scores"),
}
# seam: in benchmarks/transfer.py on EfficientNet-Lite0 (3 seeds) its policies kept as much top-1
# agreement as hawq's or more at every BitOps and latency budget, beat random-importance policies,
# transferred from a 4% or another-dataset proxy, and its search cost about half of hawq's.
DEFAULT_METHOD = "seam"


def check_method(name: str) -> None:
    if name not in METHODS:
        raise MpqcError(f"unknown search method '{name}': use one of {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class Scored:
    """A method's scores and what it records about how it got them (plain JSON: a trained method's
    iterations, convergence and how far its steps moved; HAWQ's Hutchinson iterations)."""

    scores: dict[tuple[str, str], float]
    details: dict


def score_layers(method: str, context: "SensitivityContext") -> dict[tuple[str, str], float]:
    """(layer, precision) -> score for every candidate of every layer; fp32 scores 0."""
    return scored_layers(method, context).scores


def scored_layers(method: str, context: "SensitivityContext") -> Scored:
    """The scores with the method's record of them. A method function returns its scores, or a Scored."""
    check_method(method)
    module_name, function = METHODS[method]
    result = getattr(importlib.import_module(module_name), function)(context)
    scored = result if isinstance(result, Scored) else Scored(result, {})
    missing = [(layer, p) for layer, names in context.candidates.items() for p in names if (layer, p) not in scored.scores]
    if missing:
        raise RuntimeError(f"method {method} scored no value for {missing[:3]}")
    return scored
