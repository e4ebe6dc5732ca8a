"""`mpqc build --method`: the sensitivity methods by name, each (SensitivityContext) -> scores."""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

from mpqc.errors import MpqcError
from mpqc.interrupts import deferred_interrupts

if TYPE_CHECKING:  # the CLI reads METHODS for --method's choices: keep importing this module cheap
    from mpqc.sensitivity.context import SensitivityContext

# name -> (module, function). Imported on use: the trained methods pull in more of torch.
METHODS = {
    "seam": ("mpqc.sensitivity.indicators", "seam_scores"),
    "limpq": ("mpqc.sensitivity.indicators", "limpq_scores"),
    "asga": ("mpqc.sensitivity.indicators", "asga_scores"),
    "hawq": ("mpqc.sensitivity.hawq", "hawq_scores"),
    "qerror": ("mpqc.sensitivity.qerror", "context_scores"),
    "output": ("mpqc.sensitivity.output", "output_scores"),
}
# output: the one method whose measured ranking meets the bar on every model measured
# (benchmarks/search_validation.py, 100 random policies each: Kendall tau 0.96 on EfficientNet-Lite0
# after 26 s of scoring and 0.97 on MiniLM, its policies above every random one at three budgets on
# both; qerror ranks EfficientNet-Lite0 at 0.85 in 2.8 s but MiniLM at 0.59, limpq EfficientNet-Lite0
# at 0.58 in an hour). See the README.
DEFAULT_METHOD = "output"
# The methods that train indicators, and so read --iterations, --epochs, --gmpq and --fixed-ends.
TRAINED_METHODS = ("seam", "limpq", "asga")


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
    with deferred_interrupts():  # the first import of torch: see mpqc.interrupts
        method_function = getattr(importlib.import_module(module_name), function)
    result = method_function(context)
    scored = result if isinstance(result, Scored) else Scored(result, {})
    missing = [(layer, p) for layer, names in context.candidates.items() for p in names if (layer, p) not in scored.scores]
    if missing:
        raise RuntimeError(f"method {method} scored no value for {missing[:3]}")
    return scored
