"""What the FLOAT16 lowering of a TensorRT target costs in fidelity, against the same lowering in FLOAT.

trt-a100 lowers with float_type = "float16", so an engine runs its float layers in FP16. This
builds every bundled example for trt-a100 twice, once as it is and once with float_type "float32",
and records the fidelity of each against the FP32 model, measured by ONNX Runtime CPU running the
QDQ model (exact INT8 kernels). No latency: that needs the engine, on the GPU.

    python benchmarks/float16.py [--out benchmarks/results/float16_trt-a100.json]

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

from mpqc.files import write_atomically
from mpqc.pipeline.build import build
from mpqc.pipeline.options import BuildOptions
from mpqc.targets import find_target_file
from mpqc.versions import provenance

RESULTS = HERE / "results"
TARGET = "trt-a100"
CASES = {
    "mnist-cnn": ["uniform:fp32", "uniform:w8a8", "uniform:w4a16"],
    "efficientnet-lite0": ["uniform:fp32", "uniform:w8a8", "uniform:w4a16"],
    "minilm": ["uniform:fp32", "uniform:w8a8", "uniform:w4a16"],
}


def float32_target(workdir: pathlib.Path) -> pathlib.Path:
    """The target file with float_type "float32": the same lowering, FLOAT throughout."""
    text = find_target_file(TARGET).read_text()
    if 'float_type = "float16"' not in text:
        raise SystemExit(f"{TARGET}.toml no longer lowers to float16: nothing to compare")
    path = workdir / f"{TARGET}-float32.toml"
    path.write_text(text.replace('float_type = "float16"', 'float_type = "float32"'))
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--out", default=str(RESULTS / f"float16_{TARGET}.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = {"float16": TARGET, "float32": str(float32_target(pathlib.Path(tmp)))}
        for model in args.models:
            for policy in CASES[model]:
                row = {"model": model, "policy": policy}
                for float_type, target in targets.items():
                    start = time.perf_counter()
                    record = build(BuildOptions(model=model, target=target, policy=policy), None).to_json()
                    row[float_type] = {"fidelity": record["measured"]["fidelity"], "build_wall_s": time.perf_counter() - start,
                                       "model_sha256": record["artifacts"]["model.qdq.onnx"]}
                rows.append(row)
                shown = {t: {k: round(v, 4) for k, v in row[t]["fidelity"].items() if k in (
                    "accuracy", "top1_agreement", "cosine_mean", "neighbor_agreement", "sqnr_db")} for t in targets}
                print(f"{model:20s} {policy:14s} {shown}", flush=True)
    result = {
        "benchmark": f"float16_{TARGET}",
        "fidelity_runtime": record["measured"]["fidelity_runtime"],
        **provenance(),
        "rows": rows,
    }
    out = write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
