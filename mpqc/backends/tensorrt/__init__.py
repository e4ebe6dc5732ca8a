"""TensorRT on NVIDIA GPUs: engines from mpqc's QDQ models (mpqc.backends.tensorrt.engine), their
explicit-quantization rules (rules), the engine inspector's precision report (inspector) and the
INT4 conv plugin's graph rewrite (int4_conv_plugin_graph)."""

from __future__ import annotations

from mpqc.backends.onnxruntime.runner import numerics_target
from mpqc.backends.tensorrt import engine
from mpqc.backends.tensorrt.rules import check_tensorrt_conformance
from mpqc.targets import Target


class TensorRTBackend:
    name = "tensorrt"
    measures_latency = False  # engines are timed by `mpqc profile` on the GPU, not by a build
    has_rules = True

    def load(self, model: bytes, target: Target) -> engine.TensorRTRunner:
        plugin_model, _ = engine.prepare_for_tensorrt(model, target)
        return engine.TensorRTRunner(engine.build_engine(plugin_model, target))

    def fingerprint(self, target: Target) -> dict:
        """GPU, its compute capability, TensorRT version, builder optimization level and the float
        type the unquantized layers run in."""
        return {"target": target.name, **engine.device_fingerprint(),
                "builder_optimization_level": target.runtime.builder_optimization_level,
                "float_type": target.float_type}

    def numerics_target(self, target: Target) -> Target:
        # ONNX Runtime with exact INT8 kernels computes what the Q/DQ graph states.
        return numerics_target()

    def violations(self, model, target: Target) -> list:
        return check_tensorrt_conformance(model, int4_conv_plugin=target.plugins.int4_conv)

    def artifacts(self, model: bytes, target: Target, policy, layers, batch: int, tables) -> tuple[dict[str, bytes], dict]:
        return engine.engine_artifacts(model, target, policy, layers, batch, tables)


BACKEND = TensorRTBackend()
