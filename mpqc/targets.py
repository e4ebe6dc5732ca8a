"""Targets are data: a TOML file per backend/device saying what runs there and how to run it."""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib

from mpqc.errors import MpqcError
from mpqc.files import read_text
from mpqc.precision import PRECISIONS, Precision

# Targets shipped with mpqc sit beside the package (repo checkout) or inside it (installed wheel).
_BUNDLED_DIRS = (
    pathlib.Path(__file__).resolve().parent / "targets",
    pathlib.Path(__file__).resolve().parent.parent / "targets",
)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A target's [runtime] section: how its backend runs a model. Each backend reads its own keys."""

    # ONNX Runtime session options (0 threads: ONNX Runtime's own choice).
    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    graph_optimization_level: str = "all"  # disable, basic, extended or all
    session_config: dict[str, str] = dataclasses.field(default_factory=dict)  # extra session config entries
    # TensorRT builder options.
    workspace_mib: int = 1024
    builder_optimization_level: int = 3
    timing_cache: str | None = None  # file name of the timing cache (default: <target>.timing.cache)
    profiling_verbosity: str = "detailed"
    strongly_typed: bool = True
    max_batch: int = 32  # the largest batch an engine's optimization profile admits


@dataclasses.dataclass(frozen=True)
class Plugins:
    """A target's [plugins] section: kernels mpqc supplies where the runtime has none."""

    int4_conv: bool = False  # w4a8 Conv layers run through mpqc's INT4 conv plugin (TensorRT)


_GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# Inclusive bounds of the [runtime] integers. Threads: ONNX Runtime starts as many as asked (0 is
# its own choice), and 100000 threads exhaust the process limit long before they help; 1024 is
# above any CPU ONNX Runtime runs on, and a fixed bound (not os.cpu_count()) keeps one target file
# valid on every machine. Workspace: a memory pool limit passed to TensorRT in bytes; 1 TiB is
# above any GPU's memory and keeps MiB * 2**20 within its 64-bit size. Builder optimization
# levels: TensorRT's 0..5. Max batch: the optimization profile's largest batch sizes the
# engine's activation memory; 4096 is past any batch mpqc times (a larger --batch still widens
# the profile of its own run).
_RUNTIME_RANGES = {
    "intra_op_num_threads": (0, 1024),
    "inter_op_num_threads": (0, 1024),
    "workspace_mib": (1, 2**20),
    "builder_optimization_level": (0, 5),
    "max_batch": (1, 4096),
}
# [lowering] int4_block_size per backend: ONNX Runtime fuses block-wise INT4 weights into
# MatMulNBits only for a power-of-two block of 16 to 256 (its MLAS kernels' block lengths);
# TensorRT takes 64 or 128 (mpqc.backends.tensorrt.rules.INT4_BLOCK_SIZES, not imported here:
# that package imports this module).
_INT4_BLOCK_SIZES = {"onnxruntime": (16, 32, 64, 128, 256), "tensorrt": (64, 128)}
_LOWERING_KEYS = ("quantize_layer_outputs", "activation_type", "int4_block_size", "float_type", "region_ops",
                  "region_passthrough_ops", "int32_gemm_bias")
# Ops that may join an INT8 region only with every input quantized (a constant input keeps them out).
_REGION_OP_TYPES = ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax")
# Ops that move or select values: they keep their input's scale, read one data input (input 0).
_PASSTHROUGH_OP_TYPES = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Slice",
                         "Gather", "GatherElements", "Expand", "Tile", "ReduceMax", "ReduceMin")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    backend: str
    device: str
    runtime: Runtime
    quantize_layer_outputs: bool
    activation_type: str  # "int8" (symmetric, zero point 0) or "uint8" (asymmetric)
    int4_block_size: int
    float_type: str  # "float32" or "float16": the type of every float tensor of the lowered model
    # Non-layer ops that join a region of INT8 layers (Q/DQ around them), and those among them that
    # keep their input's scale; a float layer is a region boundary (mpqc.lower.qdq).
    region_ops: tuple[str, ...]
    region_passthrough_ops: tuple[str, ...]
    int32_gemm_bias: bool  # Gemm biases of INT8 layers as INT32 behind a DQ (ONNX Runtime's QGemm needs it)
    deploy: dict[str, tuple[str, ...]]  # op type -> precisions with a real kernel
    evaluate: dict[str, tuple[str, ...]]  # op type -> precisions that can be run numerically
    plugins: Plugins
    path: pathlib.Path

    def precisions_for(self, op_type: str, *, deployable_only: bool = True) -> tuple[Precision, ...]:
        table = self.deploy if deployable_only else self.evaluate
        return tuple(PRECISIONS[name] for name in table.get(op_type, ("fp32",)))

    def check_precision(self, op_type: str, precision: Precision, *, deployable_only: bool, layer: str) -> None:
        allowed = [p.name for p in self.precisions_for(op_type, deployable_only=deployable_only)]
        if precision.name not in allowed:
            what = "deploys" if deployable_only else "can evaluate"
            hint = "" if not deployable_only else " (pass --evaluate-only to build it for accuracy studies)"
            raise MpqcError(
                f"layer '{layer}' ({op_type}) asks for {precision.name}, but target '{self.name}' "
                f"{what} only {', '.join(allowed)} for {op_type}{hint}"
            )


def find_target_file(name_or_path: str) -> pathlib.Path:
    try:
        return _find_target_file(name_or_path)
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        reason = getattr(exc, "strerror", None) or exc
        raise MpqcError(f"target '{name_or_path}' cannot be looked up ({reason}); give a bundled name or a path to a .toml file") from None


def _find_target_file(name_or_path: str) -> pathlib.Path:
    candidate = pathlib.Path(name_or_path)
    if candidate.suffix == ".toml":
        if candidate.is_file():
            return candidate
        raise MpqcError(f"target file '{name_or_path}' does not exist")
    for folder in _BUNDLED_DIRS:
        path = folder / f"{name_or_path}.toml"
        if path.is_file():
            return path
    known = sorted({p.stem for folder in _BUNDLED_DIRS if folder.is_dir() for p in folder.glob("*.toml")})
    raise MpqcError(f"unknown target '{name_or_path}': use one of {', '.join(known)} or a path to a .toml file")


def load_target(name_or_path: str) -> Target:
    path = find_target_file(name_or_path)
    data = _read_toml(path)
    backend = _string(data, "backend", "onnxruntime", path)
    lowering = data.get("lowering", {})
    if not isinstance(lowering, dict):
        raise MpqcError(f"target '{path}': [lowering] must be a table")
    unknown = sorted(set(lowering) - set(_LOWERING_KEYS))
    if unknown:
        raise MpqcError(f"target '{path}': unknown [lowering] key(s) {', '.join(unknown)}; known: {', '.join(_LOWERING_KEYS)}")
    deploy = _precision_table(data.get("deploy", {}), "deploy", path)
    evaluate = _precision_table(data["evaluate"], "evaluate", path) if "evaluate" in data else deploy
    return Target(
        name=_string(data, "name", path.stem, path),
        backend=backend,
        device=_string(data, "device", "cpu", path),
        runtime=_section(Runtime, data.get("runtime", {}), "runtime", path),
        quantize_layer_outputs=_flag(lowering.get("quantize_layer_outputs", False), "quantize_layer_outputs", path),
        activation_type=_activation_type(lowering.get("activation_type", "int8"), path),
        int4_block_size=_int4_block_size(lowering.get("int4_block_size", 64), backend, path),
        float_type=_float_type(lowering.get("float_type", "float32"), path),
        region_ops=_op_list(lowering.get("region_ops", []), "region_ops", _REGION_OP_TYPES, path),
        region_passthrough_ops=_op_list(lowering.get("region_passthrough_ops", []), "region_passthrough_ops",
                                        _PASSTHROUGH_OP_TYPES, path),
        int32_gemm_bias=_flag(lowering.get("int32_gemm_bias", False), "int32_gemm_bias", path),
        deploy=deploy,
        evaluate=evaluate,
        plugins=_section(Plugins, data.get("plugins", {}), "plugins", path),
        path=path,
    )


def _read_toml(path: pathlib.Path) -> dict:
    text = read_text(path, "target file", "save it as UTF-8 TOML")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MpqcError(f"target file '{path}' is not valid TOML: {exc}") from None
    except RecursionError:
        raise MpqcError(f"target file '{path}' is not valid TOML: it nests too deeply") from None


def _string(data: dict, key: str, default: str, path: pathlib.Path) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise MpqcError(f"target '{path}': {key} must be a non-empty string, not {value!r}")
    # The name is also the folder of the target's latency tables, beside the file.
    if key == "name" and not _is_plain_name(value):
        raise MpqcError(f"target '{path}': name must be a plain name without folders, not {value!r}")
    return value


def _precision_table(table, section: str, path: pathlib.Path) -> dict[str, tuple[str, ...]]:
    """[deploy] or [evaluate]: op type -> list of precision names, every name known."""
    if not isinstance(table, dict):
        raise MpqcError(f"target '{path}': [{section}] must be a table of op type -> list of precision names, not {table!r}")
    for op, names in table.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MpqcError(f"target '{path}': [{section}] {op!r} must be a list of precision names, not {names!r}")
        unknown = [n for n in names if n not in PRECISIONS]
        if unknown:
            raise MpqcError(f"target '{path}': [{section}] {op!r} lists unknown precision(s) {unknown}; use {', '.join(PRECISIONS)}")
    return {op: tuple(names) for op, names in table.items()}


def _flag(value, key: str, path: pathlib.Path) -> bool:
    if not isinstance(value, bool):
        raise MpqcError(f"target '{path}': [lowering] {key} must be true or false, not {value!r}")
    return value


def _int4_block_size(value, backend: str, path: pathlib.Path) -> int:
    allowed = _INT4_BLOCK_SIZES.get(backend, _INT4_BLOCK_SIZES["onnxruntime"])
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        raise MpqcError(f"target '{path}': [lowering] int4_block_size must be one of "
                        f"{', '.join(map(str, allowed))} for backend {backend}, not {value!r}")
    return value


def _activation_type(name: str, path: pathlib.Path) -> str:
    if name not in ("int8", "uint8"):
        raise MpqcError(f"target '{path}': [lowering] activation_type must be int8 or uint8, not {name!r}")
    return name


def _op_list(value, key: str, known: tuple[str, ...], path: pathlib.Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(op, str) for op in value):
        raise MpqcError(f"target '{path}': [lowering] {key} must be a list of op type names, not {value!r}")
    unknown = [op for op in value if op not in known]
    if unknown:
        raise MpqcError(f"target '{path}': [lowering] {key} lists op type(s) mpqc cannot place in a region: "
                        f"{', '.join(unknown)}; use some of {', '.join(known)}")
    return tuple(dict.fromkeys(value))


def _float_type(name: str, path: pathlib.Path) -> str:
    if name not in ("float32", "float16"):
        raise MpqcError(f"target '{path}': [lowering] float_type must be float32 or float16, not {name!r}")
    return name


def _section(kind, values, section: str, path: pathlib.Path):
    """A typed section from its TOML table: every key known, every value of the field's type."""
    if not isinstance(values, dict):
        raise MpqcError(f"target '{path}': [{section}] must be a table")
    fields = {field.name: field for field in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise MpqcError(f"target '{path}': unknown [{section}] key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    for name, value in values.items():
        default = getattr(kind(), name)
        expected = type(default) if default is not None else str
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)) or not isinstance(value, expected):
            raise MpqcError(f"target '{path}': [{section}] {name} must be {expected.__name__}, not {value!r}")
    section_value = kind(**values)
    return _check_runtime(section_value, path) if isinstance(section_value, Runtime) else section_value


def _check_runtime(runtime: Runtime, path: pathlib.Path) -> Runtime:
    """Ranges and choices of the [runtime] values, once their types are known to be right."""
    for name, (low, high) in _RUNTIME_RANGES.items():
        value = getattr(runtime, name)
        if not low <= value <= high:
            raise MpqcError(f"target '{path}': [runtime] {name} must be between {low} and {high}, not {value}")
    if runtime.graph_optimization_level not in _GRAPH_OPTIMIZATION_LEVELS:
        raise MpqcError(f"target '{path}': [runtime] graph_optimization_level must be one of "
                        f"{', '.join(_GRAPH_OPTIMIZATION_LEVELS)}, not '{runtime.graph_optimization_level}'")
    # The cache's name is joined to the tables folder: a path here would write outside it.
    if runtime.timing_cache is not None and not _is_plain_name(runtime.timing_cache):
        raise MpqcError(f"target '{path}': [runtime] timing_cache must be a file name without folders, not '{runtime.timing_cache}'")
    for key, value in runtime.session_config.items():
        if isinstance(value, (dict, list)):
            raise MpqcError(f"target '{path}': [runtime] session_config entry '{key}' must be a string, not {value!r}")
    config = {key: str(value) for key, value in runtime.session_config.items()}
    return dataclasses.replace(runtime, session_config=config)


def _is_plain_name(value: str) -> bool:
    """A file or folder name, not a path: joined to a folder, it stays inside that folder."""
    return value not in ("", ".", "..") and not any(c in value for c in "/\\\0")
