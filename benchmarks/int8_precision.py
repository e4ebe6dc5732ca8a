"""Uniform w8a8 on this CPU with ONNX Runtime's exact and default INT8 kernels.

On x86 CPUs without VNNI, ONNX Runtime's u8s8 QLinearConv/QLinearMatMul kernels multiply-add
pairs of products into 16-bit lanes (AVX2's vpmaddubsw), which saturate when weights come near
+-127 and activations near 255. The session option "session.x64quantprecision" = "1" makes them
exact and slower. For each example this script lowers uniform w8a8 once and measures fidelity and
batch-1 latency under both settings, beside FP32, recording the CPU's INT8 features.

    python benchmarks/int8_precision.py [--models efficientnet-lite0 mnist-cnn] [--runs 100]

Writes benchmarks/results/int8_precision_<cpu features>.json. Every number in it is measured by this run.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from mpqc.backends.onnxruntime.runner import OrtRunner, with_exact_int8
from mpqc.bench.latency import first_batch, measure_latency
from mpqc.examples import load_example
from mpqc.files import write_atomically
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.policy import Policy
from mpqc.targets import load_target
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def measure(model, target, feeds, reference, labels, runs: int) -> dict:
    runner = OrtRunner(model, target)
    outputs = runner.run_batched(feeds)
    row = {"median_ms": measure_latency(runner, first_batch(feeds, 1), warmup=5, runs=runs).median_ms}
    if labels is not None:
        row["top1_accuracy"] = float(np.mean(outputs.argmax(1) == labels))
    row["top1_agreement_with_fp32"] = float(np.mean(outputs.argmax(1) == reference.argmax(1)))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "mnist-cnn"])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()

    target = load_target("ort-cpu")
    results = {}
    for name in args.models:
        example, analysis = load_example(name), analyze(name)
        lowering = Lowering.prepare(analysis, target, example.proxy_feeds(None))
        feeds, labels = example.eval_feeds()
        float_bytes = lowering.float_model.SerializeToString()
        reference = OrtRunner(float_bytes, target).run_batched(feeds)
        w8a8 = lowering.lower(Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "uniform:w8a8"))
        rows = {"fp32": measure(float_bytes, target, feeds, reference, labels, args.runs)}
        for exact in (False, True):
            rows[f"w8a8 x64quantprecision={int(exact)}"] = measure(w8a8, with_exact_int8(target, exact), feeds, reference,
                                                                   labels, args.runs)
        results[name] = {"eval_samples": len(reference), **rows}
        print(name, json.dumps(rows), flush=True)

    record = {"benchmark": "int8_precision", "target": target.name, **provenance(), "batch": 1, "timed_runs": args.runs,
              "results": results}
    features = "-".join(record["machine"]["int8_features"]) or "none"
    out = write_atomically(RESULTS / f"int8_precision_{features}.json", json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
