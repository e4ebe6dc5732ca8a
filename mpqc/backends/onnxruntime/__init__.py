"""ONNX Runtime on the CPU, the embedded default backend."""

from __future__ import annotations

from mpqc.backends.onnxruntime.runner import NAME, OrtRunner
from mpqc.targets import Target
from mpqc.versions import machine, versions


class OnnxRuntimeBackend:
    name = NAME
    measures_latency = True
    has_rules = False

    def load(self, model: bytes, target: Target) -> OrtRunner:
        return OrtRunner(model, target)

    def fingerprint(self, target: Target) -> dict:
        """CPU and its INT8 features, cores, threads, ONNX Runtime version."""
        info = machine()
        print_ = {
            "target": target.name,
            "cpu": info["cpu"],
            "cores": info["cores"],
            "arch": info["arch"],
            "int8_features": info["int8_features"],
            "intra_op_num_threads": target.runtime.intra_op_num_threads,
            "runtime": "onnxruntime " + versions()["onnxruntime"],
        }
        # Only a FLOAT16 lowering says so: the FLOAT tables measured before float_type existed stay valid.
        return print_ | ({"float_type": target.float_type} if target.float_type != "float32" else {})

    def numerics_target(self, target: Target) -> Target:
        return target

    def violations(self, model, target: Target) -> list:
        return []

    def artifacts(self, model: bytes, target: Target, policy, layers, batch: int, tables) -> tuple[dict[str, bytes], None]:
        return {}, None


BACKEND = OnnxRuntimeBackend()
