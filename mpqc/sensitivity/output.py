"""`output`: how far the model's output moves when one layer alone is quantized, in the real lowering.

For every layer and quantized candidate, the model is lowered with that layer at that precision and
every other layer float, exactly as a build lowers it (same calibration, bias correction and Q/DQ
placement, so the Q/DQ pairs and fused ops around the layer count too), and run on the target's
backend over the proxy samples. The score is the output's MSE against the float model's, divided
by the float output's mean square. The ILP adds the scores up, which is the first-order picture
of independent errors: their variances add. This is AIMET AMP's first phase (one layer at a time,
the end-to-end metric), with the proxy's output error as the metric so it needs no labels.

qerror measures a layer's own output error; a transformer's residual stream and LayerNorms weigh
those errors unevenly by the time they reach the output, which only an end-to-end measurement
sees. Cost: one lowering and one backend run per (layer, quantized precision).
"""

from __future__ import annotations

import numpy as np

from mpqc import progress
from mpqc.errors import MpqcError
from mpqc.precision import precision
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.methods import Scored


def output_scores(context: SensitivityContext) -> Scored:
    if context.run_policy is None:
        raise MpqcError("--method output lowers and runs the model, and this caller gave it no backend: "
                        "run it through mpqc build or mpqc search validate")
    reference = np.asarray(context.run_policy({}), dtype=np.float64)
    power = float(np.mean(reference ** 2)) or 1.0
    probes = [(layer, name) for layer, names in context.candidates.items() for name in names if not precision(name).is_float]
    scores = {(layer, name): 0.0 for layer, names in context.candidates.items() for name in names
              if precision(name).is_float}
    for layer, name in progress.bar(probes, "lowering each layer alone", unit="layer"):
        outputs = np.asarray(context.run_policy({layer: name}), dtype=np.float64)
        scores[(layer, name)] = float(np.mean((outputs - reference) ** 2)) / power
    return Scored(scores, {"lowered_policies": len(probes) + 1, "samples": int(len(reference))})
