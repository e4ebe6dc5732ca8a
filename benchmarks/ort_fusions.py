"""ONNX Runtime's SkipLayerNormalization fusion on the CPU: FP32 and uniform w8a8 with it and without it.

ONNX Runtime fuses a residual Add and the LayerNormalization after it into one
SkipLayerNormalization kernel. On the CPU that kernel can be slower than the two ops it replaces;
the `ort-cpu` target then turns the fusion off for every model it runs
(`optimization.disable_specified_optimizers` in `[runtime] session_config`). This script measures
the choice: for each model, FP32 and mpqc's uniform w8a8 model each run in two sessions, one with
the target's session options as shipped without that entry (fusion on) and one with the fusion
off, all four in interleaved rounds (batch 1). The optimized graph's op counts show which kernels
ran.

    python3 benchmarks/ort_fusions.py [--models minilm efficientnet-lite0] [--rounds 11]

Writes benchmarks/results/ort_fusions_ort_cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from mpqc.backends.base import backend_for
from mpqc.backends.onnxruntime.runner import optimized_op_counts
from mpqc.bench.latency import first_batch, measure_interleaved
from mpqc.data.proxy import ProxySource, proxy_feeds
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.pipeline.fidelity import evaluation_data
from mpqc.policy import Policy
from mpqc.targets import load_target
from mpqc.versions import machine, versions

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DISABLE = "optimization.disable_specified_optimizers"
FUSION = "SkipLayerNormFusion"


def _with_fusion(target, fused: bool):
    """The target's runtime with the SkipLayerNormalization fusion on or off, other entries kept."""
    config = dict(target.runtime.session_config)
    disabled = [name for name in config.pop(DISABLE, "").split(",") if name and name != FUSION]
    if not fused:
        disabled.append(FUSION)
    if disabled:
        config[DISABLE] = ",".join(disabled)
    return dataclasses.replace(target, runtime=dataclasses.replace(target.runtime, session_config=config))


def run(model: str, rounds: int) -> dict:
    analysis = analyze(model)
    target = load_target("ort-cpu")
    feeds, _ = proxy_feeds(ProxySource(None), analysis.loaded)
    eval_feeds, _, _ = evaluation_data(analysis.loaded, feeds)
    policy = Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "uniform:w8a8")
    models = {"fp32": analysis.loaded.model.SerializeToString(), "w8a8": Lowering.prepare(analysis, target, feeds).lower(policy)}
    sessions = {}
    for fused in (True, False):
        variant = _with_fusion(target, fused)
        for name, data in models.items():
            sessions[(name, fused)] = (backend_for(variant).load(data, variant), optimized_op_counts(data, variant))
    times = measure_interleaved([runner for runner, _ in sessions.values()], first_batch(eval_feeds, 1), runs=40,
                                min_rounds=rounds, max_rounds=rounds)
    rows = []
    for ((name, fused), (_, ops)), median, per_round in zip(sessions.items(), times.medians_ms, times.round_medians_ms):
        rows.append({"model": name, "skip_layer_norm_fusion": fused, "median_ms": float(median),
                     "round_medians_ms": list(per_round), "optimized_ops": ops})
    by = {(r["model"], r["skip_layer_norm_fusion"]): r["median_ms"] for r in rows}
    return {"noise_floor": times.noise_floor, "rows": rows,
            "unfused_over_fused": {name: by[(name, False)] / by[(name, True)] for name in models},
            "w8a8_speedup_vs_fp32": {"fused": by[("fp32", True)] / by[("w8a8", True)],
                                     "unfused": by[("fp32", False)] / by[("w8a8", False)]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["minilm", "efficientnet-lite0"])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    results = {"machine": machine(), "versions": versions(), "rounds": args.rounds, "models": {}}
    for model in args.models:
        result = results["models"][model] = run(model, args.rounds)
        print(f"{model}: unfused/fused {result['unfused_over_fused']}, w8a8 speed-up {result['w8a8_speedup_vs_fp32']}, "
              f"noise floor {result['noise_floor']:.3f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_fusions_ort_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
