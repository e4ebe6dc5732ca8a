"""`--policy search`: score each layer x precision on the proxy data (or read the scores from the
cache), price them (measured latency table, BitOps, bytes) and hand the ILP a SearchProblem."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import numpy as np

from mpqc.backends.base import backend_for, runtime_target
from mpqc.costmodel.fit import latency_model
from mpqc.costmodel.latency import bitops_and_size
from mpqc.costmodel.table import LatencyTable
from mpqc.data.feeds import feeds_sha256
from mpqc.errors import MpqcError
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import Analysis, at_data_sizes
from mpqc.passes.signatures import layer_signature
from mpqc.pipeline.options import BuildOptions
from mpqc.policy import Policy
from mpqc.search import cache
from mpqc.search.problem import PARETO_RESOURCES, SearchProblem
from mpqc.sensitivity.context import SensitivityContext, settings_of
from mpqc.sensitivity.defaults import INDICATOR_ITERATIONS, SEAM_TERMS
from mpqc.sensitivity.methods import DEFAULT_METHOD, Scored, check_method, scored_layers
from mpqc.targets import Target


def resolve_method(method: str | None) -> str:
    """The method asked for, else DEFAULT_METHOD (output, which needs neither a torch module nor
    class scores)."""
    if method is not None:
        check_method(method)
        return method
    return DEFAULT_METHOD


def candidates_of(analysis: Analysis, target: Target, evaluate_only: bool) -> dict[str, list[str]]:
    """Layer -> the precisions the ILP may choose: what the target deploys (or can evaluate)."""
    return {
        layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=not evaluate_only)]
        for layer in analysis.layers
    }


def prepare_search(analysis: Analysis, target: Target, float_model, feeds, options: BuildOptions,
                   labels: np.ndarray | None = None, lowering: Callable[[], Lowering] | None = None) -> SearchProblem:
    """`lowering`: the caller's, calibrated on `feeds` with `options`' settings when called (the
    output method calls it on first use; without it, that method calibrates one of its own)."""
    method = resolve_method(options.method)
    budgets = options.budgets()
    if options.pareto is not None:
        if options.pareto not in PARETO_RESOURCES:
            raise MpqcError(f"unknown --pareto resource '{options.pareto}': use one of {', '.join(PARETO_RESOURCES)}")
        if getattr(budgets, options.pareto) is not None:
            raise MpqcError(f"--pareto {options.pareto} sweeps that budget itself: drop --budget-{options.pareto}")
    elif not budgets.any:
        raise MpqcError("--policy search needs a budget: --budget-ms, --budget-bitops or --budget-bytes (or --pareto)")
    layers = analysis.layers
    candidates = candidates_of(analysis, target, options.evaluate_only)
    costed = at_data_sizes(analysis, feeds)  # costs at the proxy's sizes, as `mpqc profile` measured them
    latency = None
    if budgets.ms is not None or options.pareto == "ms":
        latency = latency_model(costed, target, LatencyTable.for_target(target, options.tables), options.batch)
    costs = {
        (layer.name, p): bitops_and_size(layer_signature(costed.model, layer), p)
        for layer in layers for p in candidates[layer.name]
    }
    unscored = SearchProblem(
        layers=layers, ties=analysis.ties, candidates=candidates,
        loss={item: 0.0 for item in costs},
        scores_cached=False,
        latency=latency,
        bitops={k: v[0] for k, v in costs.items()},
        size_bytes={k: v[1] for k, v in costs.items()},
        budgets=budgets,
        method=method,
        model=options.model,
        target=options.target,
    )
    # Whether the budgets can be met depends on no score: say so in milliseconds, not after scoring.
    unscored.pareto(options.pareto) if options.pareto is not None else unscored.solve(budgets.ms)
    context = sensitivity_context(analysis, target, float_model, feeds, candidates, options, labels, lowering)
    cache_dir = None if not options.use_cache else (
        pathlib.Path(options.cache_dir) if options.cache_dir is not None else cache.default_dir())
    scored, cached = cached_scores(analysis, context, method, cache_dir)
    return dataclasses.replace(unscored, loss=scored.scores, scores_cached=cached, scoring=scored.details)


def sensitivity_context(analysis: Analysis, target: Target, float_model, feeds, candidates, options: BuildOptions,
                        labels: np.ndarray | None, lowering: Callable[[], Lowering] | None = None) -> SensitivityContext:
    loaded = analysis.loaded
    example = loaded.example
    return SensitivityContext(
        float_model=float_model, layers=analysis.layers, candidates=candidates, target=target, feeds=feeds,
        input_names=tuple(loaded.input_names), module=loaded.module, labels=labels,
        # Bundled examples say what their output is; other models are taken for classifiers.
        classifier=getattr(example, "CLASSIFIER", True),
        seed=options.seed, epochs=options.epochs, gmpq=options.gmpq, fixed_ends=options.fixed_ends,
        seam_terms=SEAM_TERMS if options.seam_terms is None else tuple(options.seam_terms),
        iterations=INDICATOR_ITERATIONS if options.iterations is None else options.iterations,
        run_policy=_policy_runner(analysis, target, feeds, options, lowering),
        calibration=repr(options.calibration_settings()),
    )


OUTPUT_SAMPLES = 32  # proxy samples the `output` method runs each lowered model on


def _policy_runner(analysis: Analysis, target: Target, feeds, options: BuildOptions, prepared: Callable[[], Lowering] | None):
    """{layer: precision} (the rest float) -> the lowered model's first output on the first
    OUTPUT_SAMPLES proxy samples; through `prepared()`, else calibrated on the whole proxy once, on first use."""
    prepare = prepared or (lambda: Lowering.prepare(analysis, target, feeds, options.calibration_settings()))
    lowering = []
    samples = {name: array[:OUTPUT_SAMPLES] for name, array in feeds.items()}
    runs_on = runtime_target(target)  # lowered for the target, run where its numbers are computed here

    def run(chosen) -> np.ndarray:
        if not lowering:
            lowering.append(prepare())
        policy = Policy(tuple((layer.name, chosen.get(layer.name, "fp32")) for layer in analysis.layers), "output probe")
        return backend_for(runs_on).load(lowering[0].lower(policy), runs_on).run_batched(samples)

    return run


def cached_scores(analysis: Analysis, context: SensitivityContext, method: str,
                  cache_dir: pathlib.Path | None) -> tuple[Scored, bool]:
    """The sensitivity scores (with the method's record of them), from the cache when an earlier
    build scored the same inputs (None: no cache). The key holds every setting of the context, so
    none can be left out."""
    if cache_dir is None:
        return scored_layers(method, context), False
    key = cache.score_key(analysis.loaded.sha256(), feeds_sha256(context.feeds), method, context.seed, context.target,
                          context.candidates, settings_of(context))
    found = cache.load_scores(cache_dir, key, context.candidates)
    if found is not None:
        return Scored(*found), True
    scored = scored_layers(method, context)
    cache.save_scores(cache_dir, key, scored.scores, scored.details)
    return scored, False
