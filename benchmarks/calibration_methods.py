"""Uniform w8a8 fidelity of each activation calibration method (`--calibration`), per model.

For EfficientNet-Lite0, MiniLM and PP-OCRv4's text detector (the models and data of
benchmarks/peers_ort_cpu.py, each in its own metric), the FP32 model is calibrated on the same
proxy data with `minmax`, `mse` and `percentile` (99.99), lowered at uniform w8a8 for ort-cpu and
measured on the held-out data against FP32. Nothing is timed: the method changes the scales, not
the graph.

    python benchmarks/calibration_methods.py [--models efficientnet-lite0 minilm ppocrv4-det]

Writes benchmarks/results/calibration_methods.json. Every number in it is measured by this run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
import time

from mpqc.backends.base import backend_for
from mpqc.files import write_atomically
from mpqc.lower.lowering import CalibrationSettings, Lowering
from mpqc.passes.analysis import analyze
from mpqc.policy import Policy
from mpqc.targets import load_target
from mpqc.versions import provenance

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = {"minmax": CalibrationSettings(method="minmax"), "mse": CalibrationSettings(method="mse"),
           "percentile": CalibrationSettings(method="percentile", percentile=99.99)}


def _peers():
    """benchmarks/peers_ort_cpu.py, for its models, data and metrics (loaded by path: the
    benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("peers_ort_cpu", HERE / "peers_ort_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def measure(peers, name: str, work: pathlib.Path) -> dict:
    started = time.perf_counter()
    case = peers.make_case(name, work)
    target = load_target("ort-cpu")
    analysis = analyze(case.spec)
    backend = backend_for(target)
    policy = Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "uniform:w8a8")
    methods, reference = {}, None
    for method, settings in METHODS.items():
        lowering = Lowering.prepare(analysis, target, case.calibration, settings)
        if reference is None:
            reference = backend.load(lowering.float_model.SerializeToString(), target).run_batched(case.heldout)
        candidate = backend.load(lowering.lower(policy), target).run_batched(case.heldout)
        value, agreement = peers.fidelity(case, reference, candidate)
        methods[method] = {"fidelity": value, "output_agreement": agreement, "ranges_cut_to_live_bounds": len(lowering.narrowed)}
        print(f"{name:>20} {method:>10}: {case.metric} {value:.4f}, cosine {agreement['cosine_mean']:.5f}", flush=True)
    return {"metric": case.metric, "fp32_model": case.info.get("fp32_model", case.spec),
            "calibration_samples": peers._count(case.calibration), "heldout_samples": peers._count(case.heldout),
            "methods": methods, "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "minilm", "ppocrv4-det"])
    args = parser.parse_args()
    peers = _peers()
    with tempfile.TemporaryDirectory() as folder:
        models = {name: measure(peers, name, pathlib.Path(folder)) for name in args.models}
    record = {"benchmark": "calibration_methods", "target": "ort-cpu", "policy": "uniform:w8a8", **provenance(),
              "methods": {name: repr(settings) for name, settings in METHODS.items()}, "models": models}
    path = write_atomically(RESULTS / "calibration_methods.json", json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
