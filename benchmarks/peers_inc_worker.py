"""Intel Neural Compressor's accuracy-aware post-training quantization of one FP32 ONNX model.

benchmarks/peers_ort_cpu.py runs this inside a virtual environment of its own (neural-compressor
2.6's ONNX adaptor needs onnx 1.16 and an onnxruntime of its time, which mpqc's environment does
not have), with `python -P` (so that this folder, whose float16.py would stand in for the module of
that name in onnxruntime.transformers, stays off the import path):

    python -P peers_inc_worker.py --model fp32.onnx --calib calib.npz --eval eval.npz --metric top1_agreement \
        --goal 0.95 --out inc.onnx --result inc.json

The .npz archives hold one array per model input, samples on axis 0. INC calibrates on --calib,
one sample per batch, and tunes until the quantized model keeps `goal` x the FP32 model's metric
(relative loss 1 - goal) on --eval, measured against the FP32 model's own outputs: it stops at
the first model that meets the goal (INC's default, --timeout 0) or after --max-trials. (With a
--timeout INC goes on looking for a faster model until then, and INC 2.6 was seen to report that
it found none at the timeout after it had logged one that met the goal.) --result gets one JSON
object: what INC found, or {"error": reason}.

The benchmark also loads this file for its fidelity metrics (numpy only), so the tuner and the
harness define them once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback

import numpy as np

# The probability a PP-OCR text detector's map must pass for a pixel to be text: the `thresh` its
# DB post-processing binarizes with (rapidocr's and PaddleOCR's default).
TEXT_THRESHOLD = 0.3


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of samples whose class scores have the same argmax."""
    ref, cand = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    return float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))


def cosine_mean(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean per-sample cosine similarity (the tuner's version; the benchmark reports mpqc's own)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-30)
    return float(np.mean((ref * cand).sum(axis=1) / norms))


def text_mask_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float = TEXT_THRESHOLD) -> float:
    """Intersection over union of two detectors' text masks (probability > threshold), pooled over
    every pixel of every image, so images without text weigh nothing; 1 where neither finds text."""
    ref, cand = reference > threshold, candidate > threshold
    union = int((ref | cand).sum())
    return float((ref & cand).sum() / union) if union else 1.0


METRICS = {"top1_agreement": top1_agreement, "cosine_mean": cosine_mean, "text_mask_iou": text_mask_iou}


class _Loader:
    """INC's calibration data loader: (inputs, label) pairs, one sample per batch."""

    batch_size = 1

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds

    def __iter__(self):
        count = len(next(iter(self.feeds.values())))
        for i in range(count):
            yield {name: array[i : i + 1] for name, array in self.feeds.items()}, None


class _ErrorLog(logging.Handler):
    """The first lines of INC's ERROR records: it logs a failed trial and returns None."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip().splitlines()[0][:400])


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def _first_output(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    count = len(next(iter(feeds.values())))
    outputs = [session.run(None, {n: a[i : i + 1] for n, a in feeds.items() if n in names})[0] for i in range(count)]
    return np.concatenate(outputs)


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def tune(args) -> dict:
    import neural_compressor
    import onnx
    import onnxruntime
    from neural_compressor import PostTrainingQuantConfig, quantization
    from neural_compressor.config import AccuracyCriterion, TuningCriterion

    calib, evaluation = _load(args.calib), _load(args.eval)
    metric = METRICS[args.metric]
    reference = _first_output(_session(args.model), evaluation)
    trials: list[float] = []

    def eval_func(model) -> float:
        value = metric(reference, _first_output(_session(model), evaluation))
        trials.append(value)
        print(f"[inc worker] evaluation {len(trials)}: {args.metric} = {value:.6f}", flush=True)
        return value

    count = len(next(iter(calib.values())))
    config = PostTrainingQuantConfig(
        approach="static",
        quant_format="QDQ",
        device="cpu",
        calibration_sampling_size=[count],
        accuracy_criterion=AccuracyCriterion(higher_is_better=True, criterion="relative", tolerable_loss=1 - args.goal),
        tuning_criterion=TuningCriterion(strategy="basic", timeout=args.timeout, max_trials=args.max_trials),
    )
    errors = _ErrorLog()
    logging.getLogger("neural_compressor").addHandler(errors)
    start = time.perf_counter()
    quantized = quantization.fit(onnx.load(args.model), config, calib_dataloader=_Loader(calib), eval_func=eval_func)
    seconds = time.perf_counter() - start
    record = {
        "versions": {"neural_compressor": neural_compressor.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": sys.version.split()[0]},
        "goal": args.goal, "metric": args.metric, "timeout_s": args.timeout, "max_trials": args.max_trials,
        "tuning_s": seconds, "evaluations": trials, "calibration_samples": count,
        "evaluation_samples": len(reference),
    }
    if quantized is None:
        reason = f"; INC logged: {errors.messages[0]}" if errors.messages else ""
        limit = f"{args.timeout} s / " if args.timeout else ""
        return record | {"error": f"INC found no quantized model keeping {args.goal:g} x the FP32 {args.metric} "
                                  f"within {limit}{args.max_trials} trials ({len(trials)} evaluations){reason}"}
    quantized.save(args.out)
    return record | {"model": args.out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--metric", required=True, choices=sorted(METRICS))
    parser.add_argument("--goal", type=float, default=0.95, help="fraction of the FP32 metric to keep")
    parser.add_argument("--timeout", type=int, default=0,
                        help="INC's tuning time limit in seconds; 0 (its default) stops at the first model that meets the goal")
    parser.add_argument("--max-trials", type=int, default=100)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    try:
        record = tune(args)
    except Exception as exc:
        traceback.print_exc()
        record = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    with open(args.result, "w") as handle:
        json.dump(record, handle, indent=1)
    return 0 if "error" not in record else 1


if __name__ == "__main__":
    sys.exit(main())
