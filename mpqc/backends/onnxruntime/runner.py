"""ONNX Runtime runner: a session configured by the target, with inputs checked on every run."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from mpqc.backends.base import Runner
from mpqc.errors import MpqcError
from mpqc.frontend.shapes import fixed_batch
from mpqc.targets import Target, load_target
from mpqc.versions import machine

NAME = "onnxruntime"  # the targets' backend name
EXACT_INT8 = "session.x64quantprecision"
INT8_DOT_PRODUCT = {"avx512_vnni", "avx_vnni", "amx_int8"}  # x86 features whose u8s8 kernels are exact

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(target: Target) -> ort.SessionOptions:
    runtime = target.runtime
    options = ort.SessionOptions()
    options.intra_op_num_threads = runtime.intra_op_num_threads
    options.inter_op_num_threads = runtime.inter_op_num_threads
    options.graph_optimization_level = _LEVELS[runtime.graph_optimization_level]
    options.log_severity_level = 3
    for key, value in runtime.session_config.items():
        options.add_session_config_entry(key, value)
    return options


def with_exact_int8(target: Target, exact: bool) -> Target:
    """The target with ONNX Runtime's exact (slower) INT8 kernels switched on or off."""
    config = {**target.runtime.session_config, EXACT_INT8: "1" if exact else "0"}
    return dataclasses.replace(target, runtime=dataclasses.replace(target.runtime, session_config=config))


def int8_saturation_note(target: Target) -> str | None:
    """Why INT8 results measured on this CPU understate other CPUs', or None.

    Without VNNI, ONNX Runtime's x86 u8s8 kernels sum pairs of products in saturating 16-bit lanes;
    benchmarks/int8_precision.py measures what that costs and what the exact kernels cost.
    """
    info = machine()
    if info["arch"] not in ("x86_64", "AMD64") or INT8_DOT_PRODUCT & set(info["int8_features"]):
        return None
    if target.runtime.session_config.get(EXACT_INT8, "0") == "1":
        return None
    return (f"this CPU has no VNNI ({', '.join(info['int8_features']) or 'no AVX2'}): ONNX Runtime's INT8 kernels "
            "saturate here, so INT8 layers lose more fidelity than on VNNI CPUs; deploy on a VNNI CPU, or set "
            f"session_config \"{EXACT_INT8}\" = \"1\" in the target (and in your own sessions) for exact, slower kernels")


def optimized_op_counts(model: bytes, target: Target) -> dict[str, int]:
    """Op type -> count in the graph ONNX Runtime runs for `model` under the target's session
    options: which integer kernels its fusions made."""
    options = session_options(target)
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(pathlib.Path(folder) / "optimized.onnx")
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled_passes(model) or None)
        counts = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(sorted(counts.items()))


def numerics_target() -> Target:
    """ONNX Runtime CPU with exact INT8 kernels: runs a model built for another backend (TensorRT)
    to measure what its Q/DQ graph computes, not how fast anything runs."""
    return with_exact_int8(load_target("ort-cpu"), True)


def disabled_passes(model: bytes | str) -> list[str]:
    """ONNX Runtime graph passes that compute a wrong model from this one.

    WeightBiasQuantization turns float Conv/Gemm biases into INT32 by dividing them by
    x_scale * w_scale in the model's own float type. In FLOAT16 the quotient passes 65504 and
    the biases turn to garbage: a FLOAT16 w8a8 EfficientNet-Lite0 agreed with FP32 on 2% of top-1
    labels with the pass and on 91% without it, as its FLOAT lowering does.
    """
    try:
        proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    except Exception:
        return []  # not a model: ONNX Runtime says so in its own words
    float16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    return ["WeightBiasQuantization"] if float16 else []


class OrtRunner(Runner):
    def __init__(self, model: bytes | str, target: Target):
        if target.backend != NAME:
            raise MpqcError(f"target '{target.name}' runs on {target.backend}, not ONNX Runtime")
        self.target = target
        try:
            self.session = ort.InferenceSession(model, session_options(target), providers=["CPUExecutionProvider"],
                                                disabled_optimizers=disabled_passes(model))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise MpqcError(f"ONNX Runtime cannot load the model: {first}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.fixed_batch = fixed_batch(self.inputs.values())
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def threads(self) -> int:
        return self.target.runtime.intra_op_num_threads

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise MpqcError(f"missing model input(s): {', '.join(missing)}")
        return self.session.run(self.output_names, {name: feeds[name] for name in self.inputs})
