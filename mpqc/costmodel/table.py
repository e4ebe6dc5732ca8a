"""Measured latency tables: one JSON file per (target, machine, runtime), keyed by layer signature.

A table is only valid on the machine and runtime that measured it, so its file name is derived
from that fingerprint; a table for another CPU or ONNX Runtime version, or for another GPU or
TensorRT version, is never read. Tables are written to a per-user folder, not beside the target.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import pathlib
import re

from mpqc.backends.base import backend_for
from mpqc.cache_folders import measurements_folder
from mpqc.errors import MpqcError
from mpqc.files import read_text, write_atomically
from mpqc.targets import Target


def fingerprint(target: Target) -> dict:
    """What a measurement depends on besides the layer, as the target's backend says: for ONNX
    Runtime the CPU and its INT8 features, cores, threads and runtime version; for TensorRT the GPU,
    its compute capability, the TensorRT version, the builder optimization level and float type."""
    return backend_for(target).fingerprint(target)


def fingerprint_id(print_: dict) -> str:
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:12]


def entry_key(signature_key: str, precision: str, batch: int) -> str:
    return f"{signature_key}@{precision}@b{batch}"


@dataclasses.dataclass
class LatencyTable:
    path: pathlib.Path
    fingerprint: dict
    entries: dict[str, dict]  # entry_key -> {"median_ms", "p10_ms", "p90_ms", "std_ms", "runs", "measured"}
    models: dict[str, dict]  # float model sha256 @ batch -> fitted boundary/overhead terms

    @classmethod
    def for_target(cls, target: Target, folder: str | pathlib.Path | None = None) -> "LatencyTable":
        """The table of this machine for `target` (empty if never measured here).

        With `folder` (--tables) it is read from and saved there. Otherwise it is saved in the
        user's measurements folder (mpqc.cache_folders) and read from there, or, until one is saved
        there, from a table shipped beside the target file (targets/<name>/) for this machine.
        """
        print_ = fingerprint(target)
        name = f"{fingerprint_id(print_)}.json"
        if folder:
            return cls._read(pathlib.Path(folder) / name, print_, "give --tables a folder")
        path = measurements_folder(target.name) / name
        shipped = target.path.parent / target.name / name
        table = cls._read(path, print_, "set MPQC_TABLES to a folder")
        if not path.is_file() and shipped.is_file():
            table = dataclasses.replace(cls._read(shipped, print_), path=path)
        return table

    @classmethod
    def _read(cls, path: pathlib.Path, print_: dict, remedy: str = "") -> "LatencyTable":
        """The table in `path` (empty if there is none); `remedy`: what to do when its folder is a file."""
        try:
            folder = next(parent for parent in path.parents if parent.exists())
            if not folder.is_dir():
                raise MpqcError(f"latency tables folder '{folder}' is a file; {remedy} (one table per machine lives there)")
            if not path.is_file():
                return cls(path, print_, {}, {})
            data = _read_json(path)
        except OSError as exc:
            raise MpqcError(f"latency table '{path}' cannot be read ({exc.strerror or exc}); "
                            f"check the folder and its permissions") from None
        if data.get("fingerprint") != print_:
            raise MpqcError(f"latency table '{path}' was measured on another machine, GPU or runtime; run 'mpqc profile' here")
        return cls(path, print_, _entries(data.get("entries", {}), path), _models(data.get("models", {}), path))

    def lookup(self, signature_key: str, precision: str, batch: int) -> float | None:
        entry = self.entries.get(entry_key(signature_key, precision, batch))
        return None if entry is None else entry["median_ms"]

    def record(self, signature_key: str, precision: str, batch: int, stats: dict) -> None:
        self.entries[entry_key(signature_key, precision, batch)] = stats | {
            "measured": datetime.date.today().isoformat()
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": "mpqc.latency_table/1",
            "fingerprint": self.fingerprint,
            "entries": dict(sorted(self.entries.items())),
            "models": dict(sorted(self.models.items())),
        }
        write_atomically(self.path, json.dumps(data, indent=1) + "\n")  # an interrupted profile leaves no torn table


_AGAIN = "delete it and run 'mpqc profile' again"  # a table is only ever written by mpqc profile
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
# The keys of a model fit's boundary terms: whether producer and consumer quantize activations, 0 or 1.
_EDGE_KIND = re.compile(r"[01][01]")


def _broken(path: pathlib.Path, field_problem: str) -> MpqcError:
    return MpqcError(f"latency table '{path}': {field_problem}; {_AGAIN}")


def _read_json(path: pathlib.Path) -> dict:
    text = read_text(path, "latency table", _AGAIN)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise MpqcError(f"latency table '{path}' is not valid JSON; {_AGAIN}") from None
    except RecursionError:  # Python's json recurses once per nesting level
        raise MpqcError(f"latency table '{path}' nests too deeply to be a latency table; {_AGAIN}") from None
    if not isinstance(data, dict):
        raise MpqcError(f"latency table '{path}' holds a JSON {_JSON_KINDS[type(data)]}, not an object with "
                        f"\"fingerprint\", \"entries\" and \"models\"; {_AGAIN}")
    return data


def _milliseconds(value) -> bool:
    """A number a latency can be: finite (JSON admits NaN and Infinity) and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entries(entries, path: pathlib.Path) -> dict[str, dict]:
    if not isinstance(entries, dict):
        raise _broken(path, f"\"entries\" must be an object of layer measurements, not {json.dumps(entries)[:40]}")
    for key, entry in entries.items():
        median = entry.get("median_ms") if isinstance(entry, dict) else None
        if not _milliseconds(median) or median < 0:
            raise _broken(path, f"entry {key!r} needs \"median_ms\" as a finite number >= 0, not {json.dumps(median)[:40]}")
    return entries


def _models(models, path: pathlib.Path) -> dict[str, dict]:
    """Every model fit has what the cost model reads: two edge-kind -> ms maps and an overhead."""
    if not isinstance(models, dict):
        raise _broken(path, f"\"models\" must be an object of model fits, not {json.dumps(models)[:40]}")
    for key, fit in models.items():
        if not isinstance(fit, dict):
            raise _broken(path, f"model fit {key!r} must be an object, not {json.dumps(fit)[:40]}")
        for field in ("boundary_ms", "boundary_ms_per_million_elements"):
            terms = fit.get(field)
            if not isinstance(terms, dict) or not all(_EDGE_KIND.fullmatch(k) and _milliseconds(v) for k, v in terms.items()):
                raise _broken(path, f"model fit {key!r} needs \"{field}\" as an object of edge kind (00, 01, 10, 11) "
                                    f"-> finite number, not {json.dumps(terms)[:40]}")
        if not _milliseconds(fit.get("overhead_ms")):
            overhead = json.dumps(fit.get("overhead_ms"))[:40]
            raise _broken(path, f"model fit {key!r} needs \"overhead_ms\" as a finite number, not {overhead}")
    return models
