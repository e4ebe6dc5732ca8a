"""Where a uniform w8a8 model's error comes from: weights or activations, and which activation quantizers.

Lowers MODEL at uniform w8a8 for the ort-cpu target from the example's calibration data, then
measures on its held-out set (cosine and top-1 agreement against FP32):

- the model as built;
- the model with every activation Q/DQ pair removed (INT8 weights, with bias correction, on float
  activations): what the weights alone cost;
- for each activation quantizer, the model with that one Q/DQ pair removed: what it costs alone.

A mixed policy can only keep whole layers float; this tells whether an INC-like fidelity (cosine
0.9998) is within reach of INT8 activations at all, and which tensors a better range would help.

    python benchmarks/error_sources.py [--model efficientnet-lite0]

Writes benchmarks/results/error_sources_<model>.json. Every number in it is measured by this run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import onnx
import onnx_ir as ir

from mpqc.backends.base import backend_for
from mpqc.data.proxy import proxy_feeds
from mpqc.files import write_atomically
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.pipeline.fidelity import evaluation_data, fidelity_of
from mpqc.pipeline.options import BuildOptions
from mpqc.policy import Policy
from mpqc.targets import load_target
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
_KEPT = ("cosine_mean", "top1_agreement", "kl_divergence", "sqnr_db")


def activation_quantizers(model: ir.Model) -> list[str]:
    """The tensors a QuantizeLinear reads that are not weights, in graph order."""
    return [node.inputs[0].name for node in model.graph if node.op_type == "QuantizeLinear" and not node.inputs[0].is_initializer()]


def without_quantizers(built: bytes, tensors: set[str]) -> bytes:
    """The model `built` with the Q/DQ pairs on `tensors` removed: their readers read the float tensor."""
    model = ir.from_proto(onnx.load_from_string(built))
    for quantizer in [node for node in model.graph if node.op_type == "QuantizeLinear" and node.inputs[0].name in tensors]:
        for dequantizer, _ in list(quantizer.outputs[0].uses()):
            ir.convenience.replace_all_uses_with(dequantizer.outputs[0], quantizer.inputs[0])
            model.graph.remove(dequantizer, safe=True)
        model.graph.remove(quantizer, safe=True)
    edited = ir.to_proto(model)
    onnx.checker.check_model(edited)
    return edited.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    args = parser.parse_args()
    started = time.perf_counter()

    target = load_target("ort-cpu")
    analysis = analyze(args.model)
    options = BuildOptions(model=args.model, target=target.name)
    feeds, origin = proxy_feeds(options.proxy_source(), analysis.loaded)
    eval_feeds, labels, data = evaluation_data(analysis.loaded, feeds)
    lowering = Lowering.prepare(analysis, target, feeds, options.calibration_settings())
    backend = backend_for(target)
    reference = backend.load(lowering.float_model.SerializeToString(), target).run_batched(eval_feeds)

    def fidelity(model_bytes: bytes) -> dict:
        measured = fidelity_of(reference, backend.load(model_bytes, target).run_batched(eval_feeds), analysis.loaded, labels, data)
        return {key: measured[key] for key in _KEPT if key in measured}

    built = lowering.lower(Policy(tuple((layer.name, "w8a8") for layer in analysis.layers), "uniform:w8a8"))
    tensors = activation_quantizers(ir.from_proto(onnx.load_from_string(built)))
    as_built = fidelity(built)
    weights_only = fidelity(without_quantizers(built, set(tensors)))
    sites = []
    for tensor in tensors:
        alone = fidelity(without_quantizers(built, {tensor}))
        low, high = lowering.ranges[tensor]
        sites.append({"tensor": tensor, "range": [low, high], "fidelity": alone,
                      "cosine_gain": alone["cosine_mean"] - as_built["cosine_mean"]})
    sites.sort(key=lambda site: -site["cosine_gain"])
    error = 1 - as_built["cosine_mean"]
    record = {
        "benchmark": "error_sources", "model": args.model, "target": target.name, "policy": "uniform:w8a8", **provenance(),
        "calibration": {"origin": origin, "samples": len(next(iter(feeds.values())))},
        "heldout": {"data": data, "samples": len(reference)},
        "as_built": as_built,
        "weights_only": weights_only,
        "error_1_minus_cosine": {
            "as_built": error,
            "weights_only": 1 - weights_only["cosine_mean"],
            "share_of_weights": (1 - weights_only["cosine_mean"]) / error,
        },
        "activation_quantizers": len(sites),
        "sum_of_single_site_gains": sum(site["cosine_gain"] for site in sites),
        "sites_worst_first": sites,
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps({key: record[key] for key in ("as_built", "weights_only", "error_1_minus_cosine")}, indent=1))
    for site in sites[:8]:
        print(f"{site['tensor']:>16}  range [{site['range'][0]:.3g}, {site['range'][1]:.3g}]  cosine gain {site['cosine_gain']:.6f}")
    path = write_atomically(RESULTS / f"error_sources_{args.model}.json", json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
