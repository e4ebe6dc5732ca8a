"""ONNX Runtime's static quantizer on one FP32 model, for benchmarks/peers_ort_cpu.py.

Run as its own process with `python -P` (Python then leaves this folder off the import path, where
benchmarks/float16.py would stand in for the module of that name that onnxruntime.transformers,
which the quantizer imports, needs):

    python -P peers_ort_worker.py --model fp32.onnx --calib calib.npz --out model.onnx \
        [--op-types Conv Gemm MatMul] [--preprocessed fp32-pre.onnx]

`quant_pre_process` first, as ONNX Runtime recommends (with the first of PRE_PROCESS's settings
that works; its output is kept at --preprocessed, its settings and the FP32 model's SHA-256 in a
.json beside it, and reused while the FP32 model is the same), then `quantize_static`: QDQ,
per-channel, QUInt8 activations, QInt8 weights, calibrated (MinMax) on every sample of --calib (one
array per model input, samples on axis 0), one sample per run; all op types it quantizes, or
--op-types only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


class Samples(CalibrationDataReader):
    def __init__(self, path: str):
        with np.load(path) as archive:
            feeds = {name: archive[name] for name in archive.files}
        count = len(next(iter(feeds.values())))
        self.samples = iter([{name: array[i : i + 1] for name, array in feeds.items()} for i in range(count)])

    def get_next(self):
        return next(self.samples, None)


# quant_pre_process's settings, tried in turn: its symbolic shape inference stops on open sizes it
# cannot relate (PP-OCR's height and width: auto_merge helps) and fails on MiniLM's Expand.
PRE_PROCESS = ({}, {"auto_merge": True}, {"skip_symbolic_shape": True})


def fp32_sha256(model: str) -> str:
    return hashlib.sha256(pathlib.Path(model).read_bytes()).hexdigest()


def pre_process(model: str, prepared: pathlib.Path, model_sha256: str) -> None:
    """quant_pre_process with the first of PRE_PROCESS that works; the settings go beside the model."""
    for settings in PRE_PROCESS:
        try:
            quant_pre_process(model, str(prepared), **settings)
        except Exception as exc:
            if settings is PRE_PROCESS[-1]:
                raise
            print(f"quant_pre_process({settings}) failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        record = {"settings": settings, "fp32_sha256": model_sha256}
        prepared.with_suffix(".json").write_text(json.dumps(record) + "\n")
        return


def _prepared_from(prepared: pathlib.Path) -> str | None:
    try:
        return json.loads(prepared.with_suffix(".json").read_text()).get("fp32_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--op-types", nargs="+", help="quantize only these op types (default: all it can)")
    parser.add_argument("--preprocessed", help="where quant_pre_process's model is kept (default: beside --out)")
    args = parser.parse_args()
    prepared = pathlib.Path(args.preprocessed or pathlib.Path(args.out).with_name("fp32-preprocessed.onnx"))
    model_sha256 = fp32_sha256(args.model)
    if not (prepared.is_file() and _prepared_from(prepared) == model_sha256):
        pre_process(args.model, prepared, model_sha256)  # none yet, or made from another FP32 model
    quantize_static(str(prepared), args.out, Samples(args.calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=args.op_types)
    return 0


if __name__ == "__main__":
    sys.exit(main())
