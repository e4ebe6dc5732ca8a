"""INT8 regions against INT8 islands on ONNX Runtime CPU: what the optimized graph runs, how fast, how faithful.

For each model, uniform w8a8 is lowered twice from the same calibration: with the `ort-cpu`
target as shipped (region ops get Q/DQ) and with its region op lists emptied (Q/DQ on layers
only, the placement before regions). Both run beside FP32 in interleaved rounds (batch 1, the
target's session options); fidelity is measured on the example's held-out set. The op types of
ONNX Runtime's optimized graph say which kernels ran.

    python3 benchmarks/regions.py [--models efficientnet-lite0 minilm] [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tempfile

from mpqc.backends.base import backend_for
from mpqc.backends.onnxruntime.runner import optimized_op_counts
from mpqc.bench.latency import first_batch, measure_interleaved
from mpqc.data.proxy import ProxySource, proxy_feeds
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.pipeline.fidelity import evaluation_data, fidelity_of
from mpqc.policy import Policy
from mpqc.targets import load_target
from mpqc.versions import machine, versions

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TARGET = pathlib.Path(__file__).resolve().parents[1] / "targets" / "ort-cpu.toml"


def _islands_target(folder: pathlib.Path) -> pathlib.Path:
    text = TARGET.read_text()
    text = re.sub(r"^region_ops = \[[^\]]*\]", "region_ops = []", text, flags=re.M)
    text = re.sub(r"^region_passthrough_ops = \[[^\]]*\]", "region_passthrough_ops = []", text, flags=re.M)
    text = re.sub(r"^int32_gemm_bias = true", "int32_gemm_bias = false", text, flags=re.M)
    path = folder / "ort-cpu-islands.toml"
    path.write_text(text.replace('name = "ort-cpu"', 'name = "ort-cpu-islands"'))
    return path


def run(model: str, rounds: int, folder: pathlib.Path) -> dict:
    analysis = analyze(model)
    feeds, _ = proxy_feeds(ProxySource(None), analysis.loaded)
    eval_feeds, labels, data = evaluation_data(analysis.loaded, feeds)
    variants = {"regions": load_target(str(TARGET)), "islands": load_target(str(_islands_target(folder)))}
    policy = Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "uniform:w8a8")
    models = {"fp32": analysis.loaded.model.SerializeToString()}
    for name, target in variants.items():
        models[name] = Lowering.prepare(analysis, target, feeds).lower(policy)
    target = variants["regions"]
    runners = {name: backend_for(target).load(data_bytes, target) for name, data_bytes in models.items()}
    reference = runners["fp32"].run_batched(eval_feeds)
    times = measure_interleaved(list(runners.values()), first_batch(eval_feeds, 1), runs=50, min_rounds=rounds, max_rounds=rounds)
    fp32_ms = float(times.medians_ms[0])
    result = {"noise_floor": times.noise_floor, "variants": {}}
    for (name, runner), median, round_medians in zip(runners.items(), times.medians_ms, times.round_medians_ms):
        result["variants"][name] = {
            "median_ms": float(median),
            "round_medians_ms": list(round_medians),
            "speedup_vs_fp32": fp32_ms / float(median),
            "fidelity": fidelity_of(reference, runner.run_batched(eval_feeds), analysis.loaded, labels, data),
            "optimized_ops": optimized_op_counts(models[name], target),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["efficientnet-lite0", "minilm"])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    results = {"machine": machine(), "versions": versions(), "rounds": args.rounds, "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            results["models"][model] = run(model, args.rounds, pathlib.Path(folder))
            for name, v in results["models"][model]["variants"].items():
                print(f"{model} {name}: {v['median_ms']:.3f} ms ({v['speedup_vs_fp32']:.2f}x), "
                      f"cosine {v['fidelity']['cosine_mean']:.4f}, ops {v['optimized_ops']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "regions_ort_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
