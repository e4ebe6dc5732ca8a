"""How well the measured cost model predicts end-to-end latency, against BitOps, on ONNX Runtime CPU.

For EfficientNet-Lite0 (batch 1) and MiniLM (batch 1, sequence 128): profile from scratch (timed;
a fit refused as unsupported or too noisy is recorded as `fit_refused` and then forced, so the
validation still judges it, with the reason beside it), profile again (timed: everything reused),
then validate on the uniform policies plus >= 30 random mixed ones, with the noise floor of
repeated measurements, then search builds at three latency budgets (is each met when measured?). Writes
benchmarks/results/costmodel_<model>.json and .png; the latency tables land in the user's measurements
folder ($MPQC_TABLES/ort-cpu, else ~/.cache/mpqc/tables/ort-cpu).

    python benchmarks/costmodel.py [--policies 30] [--models efficientnet-lite0 minilm]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from mpqc.bench.latency import first_batch
from mpqc.costmodel.table import LatencyTable
from mpqc.data.proxy import proxy_feeds
from mpqc.errors import MpqcError
from mpqc.files import write_atomically
from mpqc.passes.analysis import analyze
from mpqc.pipeline.build import build
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.profile import profile
from mpqc.pipeline.validate import validate
from mpqc.report.plots import validation_scatter
from mpqc.targets import load_target
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def run(model: str, policies: int, batch: int = 1, force_fit: bool = False, method: str = "qerror") -> dict:
    target = load_target("ort-cpu")
    analysis = analyze(model)
    options = BuildOptions(model=model)
    calibration, _ = proxy_feeds(options.proxy_source(), analysis.loaded)
    timing = first_batch(analysis.loaded.example.eval_feeds()[0], batch)
    feeds = {"calibration": calibration, "timing": timing}

    clock = time.perf_counter()
    settings = options.calibration_settings()
    try:
        first = profile(analysis, target, LatencyTable.for_target(target), feeds, batch, settings, options.seed, force=True,
                        progress=False, force_fit=force_fit)
        refused = None
    except MpqcError as error:  # the refusal is a result: recorded, then the fit is forced (and marked so) to validate it anyway
        refused = str(error)
        print(f"{model}: the fit was refused: {refused}; validating a forced fit", flush=True)
        first = profile(analysis, target, LatencyTable.for_target(target), feeds, batch, settings, options.seed,
                        progress=False, force_fit=True)
    first_s = time.perf_counter() - clock
    clock = time.perf_counter()
    again = profile(analysis, target, LatencyTable.for_target(target), feeds, batch, options.calibration_settings(), options.seed, progress=False)
    again_s = time.perf_counter() - clock

    result = validate(analysis, target, LatencyTable.for_target(target), calibration, timing, batch, options.calibration_settings(), policies=policies)
    result["fit_refused"] = refused
    result["budget_builds"] = budget_builds(model, result, batch, method)
    result["profiling"] = {
        "first_run_s": first_s, "first_run_layers": first["layers"],
        "second_run_s": again_s, "second_run_layers": again["layers"],
    }
    if refused is not None:  # the refused attempt measured the layers; first_run_layers counts the forced one after it
        result["profiling"]["first_run_layers_of"] = "the forced profile after the refused one (which measured the layers)"
    result.update(provenance())
    stem = RESULTS / f"costmodel_{model}"
    write_atomically(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    validation_scatter(result, stem.with_suffix(".png"))
    return result


def budget_builds(model: str, result: dict, batch: int, method: str) -> list[dict]:
    """Search builds at three latency budgets between the fastest uniform policy and FP32: is each met when measured?"""
    uniform = {r["policy"]: r["measured_ms"] for r in result["rows"] if r["policy"].startswith("uniform:")}
    fastest, slowest = min(uniform.values()), uniform["uniform:fp32"]
    builds = []
    for fraction in (0.25, 0.5, 0.75):
        budget = fastest + fraction * (slowest - fastest)
        record = build(BuildOptions(model=model, policy="search", method=method, budget_ms=budget, batch=batch, runs=100, warmup=20,
                                    use_cache=False), None).to_json()
        search, fidelity = record["search"], record["measured"]["fidelity"]
        builds.append({
            "budget_ms": budget,
            "predicted_ms": search["predicted_ms"],
            "measured_ms": search["measured_ms"],
            "budget_met": search["budget_met"],
            "measured_over_budget": search["measured_ms"] / budget - 1,
            "counts": record["policy"]["counts"],
            "fidelity": {k: v for k, v in fidelity.items() if isinstance(v, float)},
            "search_s": record["timings"]["search_s"],
        })
    return builds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=["efficientnet-lite0", "minilm"])
    parser.add_argument("--force-fit", action="store_true", help="write the fit even on a machine too noisy for it (recorded)")
    parser.add_argument("--method", default="qerror", help="sensitivity method of the budget builds")
    args = parser.parse_args()
    for model in args.models:
        r = run(model, args.policies, force_fit=args.force_fit, method=args.method)
        for b in r["budget_builds"]:
            print(f"  budget {b['budget_ms']:.3f} ms: predicted {b['predicted_ms']:.3f}, measured {b['measured_ms']:.3f} "
                  f"({'met' if b['budget_met'] else 'missed by %.1f%%' % (100 * b['measured_over_budget'])}), {b['counts']}")
        p, a, b, n = r["prediction"], r["additive_table_only"], r["bitops"], r["noise_floor"]
        print(
            f"{model}: profile {r['profiling']['first_run_s']:.0f} s ({r['profiling']['first_run_layers']}), "
            f"again {r['profiling']['second_run_s']:.0f} s; {r['policies']} policies: "
            f"prediction {p['within_10pct']:.0%} within ±10% / {p['within_5pct']:.0%} ±5%, tau {p['kendall_tau']:.3f}; "
            f"table only {a['within_10pct']:.0%}, tau {a['kendall_tau']:.3f}; BitOps tau {b['kendall_tau']:.3f}; "
            f"noise range {n['max_relative_range']:.1%}; a second measurement predicts the first "
            f"{n['repeat_agreement']['within_10pct']:.0%} within ±10%, tau {n['repeat_agreement']['kendall_tau']:.3f}",
            flush=True,
        )
        for problem in ([f"fit refused: {r['fit_refused']}"] if r["fit_refused"] else []) + r["flagged"]:
            print(f"{model}: flagged: {problem}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
