"""Latency and fidelity of every bundled example on ONNX Runtime CPU: FP32, uniform w8a8, uniform
INT4 weight-only (w4a16, where the target deploys it), a hand-written mixed policy for MiniLM, and
EfficientNet-Lite0's w8a8 without bias correction (the ablation behind that default).

    python benchmarks/examples.py [--runs 100] [--out benchmarks/results/examples_ort_cpu.json]

Every number in the output JSON is measured by this run; nothing is copied in.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

from mpqc.files import write_atomically
from mpqc.pipeline.build import build
from mpqc.pipeline.options import BuildOptions
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def minilm_ffn_down_fp32(record: dict) -> dict[str, str]:
    """w8a8 everywhere except the FFN down-projections, whose GELU inputs carry outliers."""
    return {
        row["name"]: "fp32" if row["name"].endswith(".output") and ".attention." not in row["name"] else "w8a8"
        for row in record["layers"]
    }


CASES = {
    "mnist-cnn": ["uniform:fp32", "uniform:w8a8", "uniform:w4a16"],
    "efficientnet-lite0": ["uniform:fp32", "uniform:w8a8", "uniform:w8a8+no-bias-correction", "uniform:w4a16"],
    "minilm": ["uniform:fp32", "uniform:w8a8", "uniform:w4a16", "mixed:ffn-down-fp32"],
}


def run_case(model: str, policy: str, runs: int, workdir: pathlib.Path, reference_record: dict | None) -> dict:
    if policy == "mixed:ffn-down-fp32":
        path = workdir / f"{model}-mixed.json"
        path.write_text(json.dumps({"layers": minilm_ffn_down_fp32(reference_record)}))
        policy_arg = str(path)
    else:
        policy_arg = policy.removesuffix("+no-bias-correction")
    start = time.perf_counter()
    options = BuildOptions(model=model, target="ort-cpu", policy=policy_arg, runs=runs, warmup=20,
                           bias_correction=not policy.endswith("+no-bias-correction"))
    record = build(options, None).to_json()
    measured = record["measured"]
    return {
        "model": model,
        "policy": policy,
        "counts": record["policy"]["counts"],
        "latency_ms": measured["latency_built"],
        "fp32_latency_ms_same_run": measured["latency_fp32"]["median_ms"],
        "speedup_vs_fp32": measured["speedup"],
        "fidelity": measured["fidelity"],
        "build_wall_s": time.perf_counter() - start,
        "_record": record,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--out", default=str(RESULTS / "examples_ort_cpu.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            reference = None
            for policy in CASES[model]:
                row = run_case(model, policy, args.runs, pathlib.Path(tmp), reference)
                reference = reference or row["_record"]
                del row["_record"]
                rows.append(row)
                f = row["fidelity"]
                shown = {k: round(v, 4) for k, v in f.items() if isinstance(v, float) and k in (
                    "accuracy", "top1_agreement", "kl_divergence", "cosine_mean", "cosine_min")}
                print(f"{model:20s} {policy:22s} {row['latency_ms']['median_ms']:8.3f} ms  x{row['speedup_vs_fp32']:.2f}  {shown}", flush=True)
    result = {
        "benchmark": "examples_ort_cpu",
        "target": "ort-cpu",
        "batch": 1,
        "runs_per_measurement": args.runs,
        **provenance(),
        "rows": rows,
    }
    out = write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
