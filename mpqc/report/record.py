"""BuildRecord: every number of one build, as written to build.json and read back from it.

The build fills it once, at the end; the report renderers read it and compute nothing.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from mpqc.errors import MpqcError

FORMAT = "mpqc.build/1"


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    model: dict  # spec, kind, float_sha256
    target: dict  # name, file_sha256
    policy: dict  # source, counts
    options: dict  # the request as given
    proxy: dict  # origin, samples, sha256
    calibration: dict
    layers: list  # one row per quantizable layer: name, op, module, signature, precisions, chosen precision
    ties: list
    artifacts: dict  # file name -> sha256
    versions: dict
    machine: dict
    seed: int
    timings: dict
    search: dict | None = None  # --policy search: method, budgets, prediction, rounds, Pareto point
    tensorrt_engine: dict | None = None  # TensorRT targets: the engine, or why none was built
    measured: dict | None = None  # latency and fidelity, where measured
    not_measured: str | None = None  # what was not measured, and why
    artifact_bytes: dict | None = None  # file name -> size in bytes
    format: str = FORMAT

    # build.json's key order, kept from the first format: optional sections sit before the timings.
    _ORDER = ("format", "model", "target", "policy", "options", "proxy", "calibration", "layers", "ties",
              "artifacts", "artifact_bytes", "versions", "machine", "seed", "search", "tensorrt_engine", "measured", "not_measured",
              "timings")

    def to_json(self) -> dict:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: values[name] for name in self._ORDER if values[name] is not None}

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: dict, origin: str = "build.json") -> "BuildRecord":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MpqcError(f"'{origin}' is not an mpqc build record ({FORMAT}); point at a folder written by mpqc build")
        names = {field.name for field in dataclasses.fields(cls)}
        required = {field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise MpqcError(f"'{origin}' is not a complete mpqc build record (missing {missing or 'nothing'}, "
                            f"unknown {unknown or 'nothing'}); rebuild it with mpqc build")
        return cls(**data)

    @classmethod
    def load(cls, path: pathlib.Path) -> "BuildRecord":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MpqcError(f"'{path}' does not exist; point at a folder written by mpqc build") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise MpqcError(f"'{path}' cannot be read as JSON ({type(exc).__name__}); rebuild it with mpqc build") from None
        return cls.from_json(data, str(path))
