"""Targets are data: a TOML file per backend/device saying what runs there and how to run it."""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib

from mpqc.errors import MpqcError
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
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MpqcError(f"target file '{path}' is not valid TOML: {exc}") from None
    lowering = data.get("lowering", {})
    deploy = {op: tuple(names) for op, names in data.get("deploy", {}).items()}
    evaluate = {op: tuple(names) for op, names in data.get("evaluate", deploy).items()}
    for table in (deploy, evaluate):
        for op, names in table.items():
            unknown = [n for n in names if n not in PRECISIONS]
            if unknown:
                raise MpqcError(f"target '{path}' lists unknown precision(s) {unknown} for {op}")
    return Target(
        name=data.get("name", path.stem),
        backend=data.get("backend", "onnxruntime"),
        device=data.get("device", "cpu"),
        runtime=_section(Runtime, data.get("runtime", {}), "runtime", path),
        quantize_layer_outputs=bool(lowering.get("quantize_layer_outputs", False)),
        activation_type=_activation_type(lowering.get("activation_type", "int8"), path),
        int4_block_size=int(lowering.get("int4_block_size", 64)),
        float_type=_float_type(lowering.get("float_type", "float32"), path),
        deploy=deploy,
        evaluate=evaluate,
        plugins=_section(Plugins, data.get("plugins", {}), "plugins", path),
        path=path,
    )


def _activation_type(name: str, path: pathlib.Path) -> str:
    if name not in ("int8", "uint8"):
        raise MpqcError(f"target '{path}': activation_type must be int8 or uint8, not '{name}'")
    return name


def _float_type(name: str, path: pathlib.Path) -> str:
    if name not in ("float32", "float16"):
        raise MpqcError(f"target '{path}': float_type must be float32 or float16, not '{name}'")
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
    if isinstance(section_value, Runtime):
        if section_value.graph_optimization_level not in _GRAPH_OPTIMIZATION_LEVELS:
            raise MpqcError(f"target '{path}': [runtime] graph_optimization_level must be one of "
                            f"{', '.join(_GRAPH_OPTIMIZATION_LEVELS)}, not '{section_value.graph_optimization_level}'")
        config = {key: str(value) for key, value in section_value.session_config.items()}
        section_value = dataclasses.replace(section_value, session_config=config)
    return section_value
