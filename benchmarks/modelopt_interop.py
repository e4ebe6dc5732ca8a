"""NVIDIA's own quantizer against mpqc's TensorRT rules and fidelity, on the bundled examples.

TensorRT cannot run here, so mpqc's TensorRT conformance checker is the only judge of its models
before they reach a GPU. NVIDIA Model Optimizer (nvidia-modelopt) writes the QDQ models TensorRT
is built to take; this script quantizes each example's FLOAT model with it (ONNX PTQ on the CPU:
INT8, and INT4 weight-only by round-to-nearest) from the same proxy data mpqc calibrates on, then
records for every model:

- what `check_tensorrt_conformance` says of it (a rule ModelOpt's output breaks is either a rule
  stricter than TensorRT or a ModelOpt model TensorRT would not run as intended);
- its fidelity against the FP32 model on the example's held-out data, run by ONNX Runtime CPU with
  exact INT8 kernels, beside mpqc's uniform w8a8 / w4a16 builds for trt-a100 measured the same way.

Needs nvidia-modelopt in the same environment as mpqc (install torch==2.13.0 first, then
`pip install "nvidia-modelopt[onnx]"`; it is not an mpqc dependency):

    python benchmarks/modelopt_interop.py [--out benchmarks/results/modelopt_interop.json]

Every number in the output JSON is measured by this run; nothing is copied in.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent

import onnx
import onnx_ir as ir

from mpqc.backends.onnxruntime.runner import OrtRunner, numerics_target
from mpqc.backends.tensorrt.rules import check_tensorrt_conformance
from mpqc.data.proxy import proxy_feeds
from mpqc.files import write_atomically
from mpqc.passes.analysis import analyze
from mpqc.pipeline.build import build, fidelity_against_float
from mpqc.pipeline.options import BuildOptions
from mpqc.versions import provenance

RESULTS = HERE / "results"
TARGET = "trt-a100"
MODELS = ["mnist-cnn", "efficientnet-lite0", "minilm"]
# ModelOpt mode -> its settings, and the mpqc policy that quantizes the same layers' weights alike.
MODES = {
    "int8": ({"quantize_mode": "int8", "calibration_method": "max"}, "uniform:w8a8"),
    "int4": ({"quantize_mode": "int4", "calibration_method": "rtn_dq", "block_size": 64}, "uniform:w4a16"),
}


def modelopt_model(float_path: pathlib.Path, feeds: dict, settings: dict, out: pathlib.Path) -> onnx.ModelProto:
    from modelopt.onnx.quantization import quantize

    quantize(onnx_path=str(float_path), calibration_data=feeds, calibration_eps=["cpu"], output_path=str(out),
             high_precision_dtype="fp16", **settings)
    return onnx.load(out)


def main() -> int:
    import modelopt

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--out", default=str(RESULTS / "modelopt_interop.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            analysis = analyze(model)
            float_model = ir.to_proto(analysis.model)  # the FLOAT model mpqc lowers, BatchNorm folded
            float_path = pathlib.Path(tmp) / f"{model}.onnx"
            onnx.save(float_model, float_path)
            feeds, origin = proxy_feeds(BuildOptions(model=model, target=TARGET).proxy_source(), analysis.loaded)
            float_runner = OrtRunner(float_model.SerializeToString(), numerics_target())
            for mode, (settings, policy) in MODES.items():
                start = time.perf_counter()
                try:
                    theirs = modelopt_model(float_path, feeds, settings, pathlib.Path(tmp) / f"{model}-{mode}.onnx")
                except Exception as exc:  # a mode ModelOpt cannot run on the CPU is recorded, not fatal
                    rows.append({"model": model, "mode": mode, "modelopt_error": f"{type(exc).__name__}: {exc}"[:500]})
                    print(f"{model:20s} {mode}: ModelOpt failed: {exc}", flush=True)
                    continue
                quantize_s = time.perf_counter() - start
                violations = check_tensorrt_conformance(theirs, int4_conv_plugin=False)
                runner = OrtRunner(theirs.SerializeToString(), numerics_target())
                fidelity, _ = fidelity_against_float(float_runner, runner, analysis.loaded, feeds, {})
                ours = build(BuildOptions(model=model, target=TARGET, policy=policy), None).to_json()
                rows.append({
                    "model": model, "mode": mode, "modelopt_settings": settings, "mpqc_policy": policy,
                    "modelopt": {
                        "violations": [str(v) for v in violations],
                        "quantized_ops": _quantized_ops(theirs),
                        "fidelity": fidelity,
                        "quantize_s": quantize_s,
                    },
                    "mpqc": {"counts": ours["policy"]["counts"], "fidelity": ours["measured"]["fidelity"]},
                })
                keys = ("top1_agreement", "cosine_mean", "accuracy", "sqnr_db")
                print(f"{model:20s} {mode}: {len(violations)} violation(s); modelopt "
                      f"{ {k: round(v, 4) for k, v in fidelity.items() if k in keys} } mpqc "
                      f"{ {k: round(v, 4) for k, v in ours['measured']['fidelity'].items() if k in keys} }", flush=True)
    result = {
        "benchmark": "modelopt_interop",
        "target": TARGET,
        "proxy": origin,
        "fidelity_runtime": "ONNX Runtime CPU (exact INT8 kernels)",
        "modelopt": modelopt.__version__,
        **provenance(),
        "rows": rows,
    }
    out = write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> how many nodes of it read a DequantizeLinear output (what ModelOpt quantized)."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized & set(node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


if __name__ == "__main__":
    sys.exit(main())
