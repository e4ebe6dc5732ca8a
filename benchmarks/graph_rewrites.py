"""mpqc's float graph rewrites on ONNX Runtime CPU: the exported model against the one mpqc lowers.

The canonical passes (mpqc.passes.pipeline) fold BatchNorm and constant affines into convs (on both
sides), fuse exported hard-swish into one op and drop dead nodes. Every quantized model mpqc builds
starts from that float model, and the peers harness (peers_ort_cpu.py) gives the same one to the
peers. This measures what the rewrites alone buy: the exported FP32 model and mpqc's float model
(every layer fp32) timed in interleaved rounds, batch 1, 2 intra-op threads, and the largest output
difference on held-out inputs. PP-OCRv4's detector comes from the rapidocr wheel as in the peers
harness; the bundled examples are measured for comparison (their graphs have nothing to rewrite
but BatchNorm, which ONNX Runtime folds itself).

    python3 benchmarks/graph_rewrites.py [--models ppocrv4-det efficientnet-lite0] [--rounds 30]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import pathlib
import sys

import numpy as np
import onnx
import onnx_ir as ir

from mpqc.backends.base import backend_for
from mpqc.bench.latency import measure_interleaved
from mpqc.passes.analysis import analyze
from mpqc.targets import load_target
from mpqc.versions import machine, versions

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
# The OCR model file and crops, as the peers harness makes them (loaded from its file).
_SPEC = importlib.util.spec_from_file_location("peers_ort_cpu", HERE / "peers_ort_cpu.py")
peers_ort_cpu = sys.modules.setdefault("peers_ort_cpu", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(peers_ort_cpu)


def run(name: str, rounds: int) -> dict:
    target = load_target("ort-cpu")
    if name == "ppocrv4-det":
        path = str(peers_ort_cpu.ocr_model_file()[0])
        analysis = analyze(path)
        feeds = {analysis.loaded.input_names[0]: peers_ort_cpu.ocr_crops("heldout")}
    else:
        path, analysis = None, analyze(name)
        feeds, _ = analysis.loaded.example.eval_feeds()
    exported = onnx.load(path).SerializeToString() if path else analysis.loaded.model.SerializeToString()
    rewritten = ir.to_proto(analysis.model).SerializeToString()
    backend = backend_for(target)
    runners = [backend.load(exported, target), backend.load(rewritten, target)]
    outputs = [runner.run_batched(feeds) for runner in runners]
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(outputs[0], outputs[1]))
    scale = max(float(np.max(np.abs(a))) for a in outputs[0])
    single = {key: value[:1] for key, value in feeds.items()}
    times = measure_interleaved(runners, single, runs=30, min_rounds=rounds, max_rounds=rounds)
    ratios = np.array(times.round_medians_ms[0]) / np.array(times.round_medians_ms[1])
    ops = [collections.Counter(n.op_type for n in onnx.load_from_string(m).graph.node) for m in (exported, rewritten)]
    return {
        "exported_ms": float(times.medians_ms[0]), "rewritten_ms": float(times.medians_ms[1]),
        "speedup": float(times.medians_ms[0] / times.medians_ms[1]),
        "paired_speedup_median": float(np.median(ratios)),
        "paired_speedup_range": [float(ratios.min()), float(ratios.max())],
        "noise_floor": times.noise_floor, "rounds": rounds,
        "max_abs_output_difference": difference, "max_abs_output": scale,
        "samples": int(next(iter(feeds.values())).shape[0]),
        "op_types": {"exported": dict(ops[0].most_common()), "rewritten": dict(ops[1].most_common())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocrv4-det", "efficientnet-lite0"])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    results = {"machine": machine(), "versions": versions(), "models": {}}
    for name in args.models:
        print(f"{name}: measuring", file=sys.stderr, flush=True)
        results["models"][name] = r = run(name, args.rounds)
        print(f"  exported {r['exported_ms']:.2f} ms, rewritten {r['rewritten_ms']:.2f} ms, paired speed-up "
              f"{r['paired_speedup_median']:.3f} [{r['paired_speedup_range'][0]:.3f}, {r['paired_speedup_range'][1]:.3f}], "
              f"max |diff| {r['max_abs_output_difference']:.2e}", file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "graph_rewrites.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
