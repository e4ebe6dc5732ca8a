"""Fidelity of a built model against its float original, on held-out data where there is some."""

from __future__ import annotations

import time

import numpy as np

from mpqc.bench.fidelity import output_agreement
from mpqc.errors import MpqcError
from mpqc.frontend.messages import first_line


def evaluation_data(loaded, feeds) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """The feeds fidelity is measured on, their labels and what they are: the example's held-out
    set where the model is a bundled example, else the proxy set."""
    if loaded.example is not None:
        eval_feeds, labels = loaded.example.eval_feeds()
        return eval_feeds, labels, "held-out eval set of the example"
    if not feeds:
        raise MpqcError("measuring needs input data: pass --proxy DATA.npz or --no-measure")
    return feeds, None, "proxy set (no held-out set for this model)"


def fidelity_of(reference: np.ndarray, candidate: np.ndarray, loaded, labels, data: str, metric=None) -> dict:
    """Every fidelity number of one candidate output against the float reference output."""
    fidelity = {"data": data, "samples": len(reference)}
    if loaded.example is not None:
        fidelity |= loaded.example.fidelity(reference, candidate, labels)
    fidelity |= output_agreement(reference, candidate)
    if metric is not None:
        fidelity |= _user_metric(metric, reference, candidate, labels)
    return fidelity


def fidelity_against_float(float_runner, built_runner, loaded, feeds, timings, metric=None) -> tuple[dict, dict[str, np.ndarray]]:
    """Agreement of the built model with the float one, and the feeds it was measured on (see
    evaluation_data). `timings` gets fidelity_s. `metric`: the user's own evaluator, whose numbers
    join the record."""
    clock = time.perf_counter()
    eval_feeds, labels, data = evaluation_data(loaded, feeds)
    reference, candidate = float_runner.run_batched(eval_feeds), built_runner.run_batched(eval_feeds)
    fidelity = fidelity_of(reference, candidate, loaded, labels, data, metric)
    timings["fidelity_s"] = time.perf_counter() - clock
    return fidelity, eval_feeds


def _user_metric(metric, reference: np.ndarray, candidate: np.ndarray, labels) -> dict[str, float]:
    """The user's evaluator's numbers, or one line saying what it did instead."""
    name = getattr(metric, "__name__", "metric")
    try:
        values = metric(reference, candidate, labels)
    except Exception as exc:
        raise MpqcError(f"--metric {name} raised {first_line(exc, with_type=True)}") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for k, v in values.items()):
        raise MpqcError(f"--metric {name} must return a dict of name -> number, not {type(values).__name__}")
    return {key: float(value) for key, value in values.items()}
