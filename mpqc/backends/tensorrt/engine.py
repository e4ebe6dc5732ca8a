"""TensorRT backend: build engines from mpqc's QDQ models, run and time them, report precisions.

Written against the TensorRT 10.x Python API (10.12+): strongly typed networks (the Q/DQ graph is
the whole precision plan; precision flags are deprecated), the ONNX parser, timing caches, the
engine inspector (ProfilingVerbosity.DETAILED) and IProfiler for per-layer times. Engines run
through cuda-python (`cuda.bindings.runtime`): device buffers, one stream, execute_async_v3.

TensorRT and cuda-python are optional (`pip install mpqc[tensorrt]` on the machine with the
GPU); every entry point here raises one clear MpqcError when they are missing.

- build_engine(onnx_bytes, target, ...) -> serialized engine bytes
- TensorRTRunner(engine_bytes): run(feeds) -> outputs, latency, layer_times
- layer_precisions(engine) / compare_with_policy(...) (mpqc.backends.tensorrt.inspector)
- engine_artifacts(...): what `mpqc build` writes for a TensorRT target (model.engine + report)
- latency tables for `mpqc profile --target trt-*` are measured by mpqc.pipeline.profile_tensorrt
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import onnx

from mpqc.backends.base import Runner
from mpqc.backends.tensorrt.inspector import engine_float_type, layer_precisions, precision_report
from mpqc.backends.tensorrt.int4_conv_plugin_graph import int4_conv_nodes, rewrite_int4_convs
from mpqc.cache_folders import measurements_folder
from mpqc.errors import MpqcError
from mpqc.files import write_atomically
from mpqc.targets import Runtime, Target

MISSING_TENSORRT = "TensorRT is not installed: install mpqc[tensorrt] on the machine with the GPU"
MISSING_CUDA_PYTHON = "cuda-python is not installed: install mpqc[tensorrt] on the machine with the GPU"


def import_tensorrt():
    """The tensorrt module, or one clear MpqcError."""
    try:
        import tensorrt
    except ImportError:
        raise MpqcError(MISSING_TENSORRT) from None
    return tensorrt


def import_cudart():
    """cuda-python's CUDA runtime bindings (cuda.bindings.runtime; `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise MpqcError(MISSING_CUDA_PYTHON) from None
    return runtime


def tensorrt_unavailable_reason(needs_plugin: bool = False) -> str | None:
    """Why no engine can be built here, or None when TensorRT, cuda-python and a GPU are there."""
    try:
        import_tensorrt()
        cudart = import_cudart()
        if not _check(cudart.cudaGetDeviceCount(), "find a CUDA GPU"):
            return "no CUDA GPU here: TensorRT engines are built on the GPU they run on"
    except MpqcError as exc:
        return str(exc)
    if needs_plugin:
        try:
            import torch
            import triton  # noqa: F401
        except ImportError:
            return "the INT4 conv plugin needs Triton: install mpqc[gpu] beside mpqc[tensorrt]"
        if not torch.cuda.is_available():
            return "the INT4 conv plugin needs a CUDA build of torch"
    return None


def require_tensorrt(needs_plugin: bool = False) -> None:
    reason = tensorrt_unavailable_reason(needs_plugin)
    if reason is not None:
        raise MpqcError(reason)


@dataclasses.dataclass(frozen=True)
class BatchRange:
    """The optimization profile of the dynamic batch dimension (axis 0 of every input)."""

    min: int = 1
    opt: int = 1
    max: int = Runtime.max_batch  # the target's [runtime] max_batch default

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise MpqcError(f"batch range needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


def _make_logger(trt):
    """A TensorRT logger that keeps errors and warnings, for error messages."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(f"{getattr(severity, 'name', severity)}: {msg}")

    return Logger()


def build_engine(onnx_bytes: bytes, target: Target, *, timing_cache_path: str | pathlib.Path | None = None,
                 workspace_bytes: int | None = None, batch: BatchRange = BatchRange()) -> bytes:
    """Build a serialized engine from a QDQ ONNX model (w4a8 convs already rewritten to Int4Conv).

    The network is strongly typed: TensorRT runs exactly the precisions the Q/DQ graph states.
    The timing cache is read from and written back to `timing_cache_path`, so a rebuild on the
    same GPU and TensorRT version skips the tactic timing that is most of a build.
    """
    trt = import_tensorrt()
    logger = _make_logger(trt)
    model = onnx.ModelProto.FromString(onnx_bytes)
    if int4_conv_nodes(model):
        from mpqc_kernels.trt_int4_conv_plugin import register

        register()  # before parsing: the parser looks Int4Conv up in the plugin registry
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MpqcError(f"TensorRT cannot parse the model for target '{target.name}' ({len(errors)} error(s)): " + "; ".join(errors))
    config = builder.create_builder_config()
    runtime = target.runtime
    workspace = workspace_bytes if workspace_bytes is not None else runtime.workspace_mib * 2**20
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = runtime.builder_optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then names each layer's types
    _add_batch_profile(builder, network, config, batch)
    cache = _load_timing_cache(config, timing_cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        log = "; ".join(logger.messages[-5:]) or "no message"
        raise MpqcError(f"TensorRT could not build an engine for target '{target.name}': {log}")
    if timing_cache_path is not None and cache is not None:
        write_atomically(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _parser_error(error) -> str:
    """One parser error as text: node, operator and description where the binding provides them."""
    try:
        return f"node '{error.node_name()}' ({error.node_operator()}): {error.desc()}"
    except AttributeError:
        return str(error)


def _add_batch_profile(builder, network, config, batch: BatchRange) -> None:
    """One optimization profile: the dynamic batch axis of each input in [min, max], tuned at opt."""
    profile = builder.create_optimization_profile()
    dynamic = False
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise MpqcError(f"input '{tensor.name}' has dynamic dimensions other than the batch: {shape}")
        if shape and shape[0] < 0:
            dynamic = True
            profile.set_shape(tensor.name, [batch.min, *shape[1:]], [batch.opt, *shape[1:]], [batch.max, *shape[1:]])
    if dynamic:
        config.add_optimization_profile(profile)


def _load_timing_cache(config, path):
    """Start from the saved timing cache; one from another GPU or TensorRT version is dropped."""
    data = b""
    if path is not None and pathlib.Path(path).is_file():
        data = pathlib.Path(path).read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a damaged file: time afresh and overwrite it
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def deserialize(engine_bytes: bytes):
    """(ICudaEngine, IRuntime): keep the runtime as long as the engine. Registers the INT4 conv
    plugin first, which an engine using it needs."""
    trt = import_tensorrt()
    _register_plugin_if_possible()
    logger = _make_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        log = "; ".join(logger.messages[-3:]) or "no message"
        raise MpqcError(f"TensorRT cannot load the engine (built for another GPU or TensorRT version?): {log}")
    return engine, runtime


def _register_plugin_if_possible() -> None:
    try:
        from mpqc_kernels.trt_int4_conv_plugin import register

        register()
    except ImportError:
        pass  # engines without Int4Conv layers load without it; one with them fails with TensorRT's message


def _make_profiler(trt):
    class LayerTimeProfiler(trt.IProfiler):
        """Collects TensorRT's per-layer times (ms) over runs. They add up to more than the engine's
        latency: timing each layer alone costs synchronisation TensorRT otherwise overlaps."""

        def __init__(self):
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name, ms):
            self.times.setdefault(layer_name, []).append(ms)

    return LayerTimeProfiler()


class _DeviceBuffer:
    """One cudaMalloc'd buffer that grows as needed."""

    def __init__(self, cudart):
        self.cudart, self.pointer, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.pointer = _check(self.cudart.cudaMalloc(max(nbytes, 1)), "allocate device memory")
            self.nbytes = nbytes
        return int(self.pointer)

    def free(self) -> None:
        if self.pointer:
            self.cudart.cudaFree(self.pointer)
        self.pointer, self.nbytes = 0, 0


def _check(result, what: str):
    """cuda-python calls return (error, *values): raise on an error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise MpqcError(f"CUDA failed to {what}: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


class TensorRTRunner(Runner):
    """Runs a serialized engine on the GPU: host arrays in, host arrays out."""

    threads = 0  # the GPU runs it; kept for LatencyStats

    def __init__(self, engine_bytes: bytes):
        trt = self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.engine, self._runtime = deserialize(engine_bytes)
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate(), "create a stream")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {n: _DeviceBuffer(self.cudart) for n in names}
        self._profiling_context = None

    def run(self, feeds: dict[str, np.ndarray], context=None) -> list[np.ndarray]:
        context = context or self.context
        missing = sorted(set(self.input_names) - set(feeds))
        if missing:
            raise MpqcError(f"missing model input(s): {', '.join(missing)}")
        h2d, d2h = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {}
        for name in self.input_names:
            array = hosts[name] = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            context.set_input_shape(name, array.shape)
            pointer = self.buffers[name].ensure(array.nbytes)
            _check(self.cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, h2d, self.stream), "copy an input")
            context.set_tensor_address(name, pointer)
        outputs = []
        for name in self.output_names:
            array = np.empty(tuple(context.get_tensor_shape(name)), self.dtypes[name])
            context.set_tensor_address(name, self.buffers[name].ensure(array.nbytes))
            outputs.append(array)
        if not context.execute_async_v3(int(self.stream)):
            raise MpqcError("TensorRT failed to run the engine")
        for name, array in zip(self.output_names, outputs):
            _check(self.cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[name].pointer, array.nbytes, d2h, self.stream),
                   "copy an output")
        _check(self.cudart.cudaStreamSynchronize(self.stream), "finish the run")
        return outputs

    def layer_times(self, feeds: dict[str, np.ndarray], runs: int = 20) -> dict[str, float]:
        """Median time (ms) of each engine layer over `runs`, from TensorRT's IProfiler."""
        if self._profiling_context is None:
            # A separate context: a profiler, once attached, slows every run it sees.
            self._profiling_context = self.engine.create_execution_context()
            self._profiling_context.profiler = _make_profiler(self.trt)
        profiler = self._profiling_context.profiler
        self.run(feeds, self._profiling_context)  # warm-up, not recorded
        profiler.times.clear()
        for _ in range(runs):
            self.run(feeds, self._profiling_context)
        return {name: float(np.median(values)) for name, values in profiler.times.items()}

    def layer_precisions(self):
        return layer_precisions(self.engine)

    def close(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def device_fingerprint() -> dict:
    """What TensorRT timings depend on besides the layer: GPU, its compute capability, TensorRT."""
    trt, cudart = import_tensorrt(), import_cudart()
    device = _check(cudart.cudaGetDevice(), "select a GPU")
    properties = _check(cudart.cudaGetDeviceProperties(device), "read the GPU's properties")
    name = properties.name.decode() if isinstance(properties.name, bytes) else str(properties.name)
    return {"gpu": name.rstrip("\x00"), "compute_capability": f"{properties.major}.{properties.minor}",
            "runtime": f"tensorrt {trt.__version__}"}


def timing_cache_path(target: Target, folder: str | pathlib.Path | None = None) -> pathlib.Path:
    """Beside the target's latency tables (--tables, else the user's measurements folder), named
    by GPU and TensorRT version (a cache from another GPU or version is useless, and TensorRT
    would refuse it)."""
    print_ = device_fingerprint()
    key = hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:12]
    name = target.runtime.timing_cache or f"{target.name}.timing.cache"
    folder = pathlib.Path(folder) if folder else measurements_folder(target.name)
    return folder / f"{key}.{name}"


def prepare_for_tensorrt(model_bytes: bytes, target: Target) -> tuple[bytes, list[str]]:
    """The QDQ model with its w4a8 convs rewritten for the INT4 conv plugin (when the target has it)."""
    if not target.plugins.int4_conv:
        return model_bytes, []
    model, rewritten = rewrite_int4_convs(onnx.ModelProto.FromString(model_bytes))
    return (model.SerializeToString(deterministic=True) if rewritten else model_bytes), rewritten


def batch_range(target: Target, batch: int) -> BatchRange:
    return BatchRange(1, batch, max(batch, target.runtime.max_batch))


def engine_artifacts(model_bytes: bytes, target: Target, policy, layers, batch: int = 1,
                     tables: str | None = None) -> tuple[dict[str, bytes], dict]:
    """What `mpqc build` adds for a TensorRT target: ({"model.engine": bytes}, build.json section).

    Without TensorRT (or cuda-python, or a GPU) nothing is built and the section says why; the
    build itself still succeeds with the checked QDQ model.
    """
    reason = tensorrt_unavailable_reason()
    if reason is None:
        plugin_model, rewritten = prepare_for_tensorrt(model_bytes, target)
        reason = tensorrt_unavailable_reason(needs_plugin=bool(rewritten))
    if reason is not None:
        return {}, {"engine_built": False, "reason": reason}
    trt = import_tensorrt()
    cache = timing_cache_path(target, tables)
    engine_bytes = build_engine(plugin_model, target, timing_cache_path=cache, batch=batch_range(target, batch))
    engine, _runtime = deserialize(engine_bytes)
    report = precision_report(layer_precisions(engine), policy, layers, engine_float_type(target))
    section = {"engine_built": True, "tensorrt": trt.__version__, "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
               "int4_conv_plugin_layers": rewritten, "timing_cache": str(cache), "batch_range": dataclasses.asdict(batch_range(target, batch)),
               "precisions": report}
    return {"model.engine": engine_bytes}, section

