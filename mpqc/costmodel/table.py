"""Measured latency tables: one JSON file per (target, machine, runtime), keyed by layer signature.

A table is only valid on the machine and runtime that measured it, so its file name is derived
from that fingerprint; a table for another CPU or ONNX Runtime version, or for another GPU or
TensorRT version, is never read.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib

from mpqc.backends.base import backend_for
from mpqc.errors import MpqcError
from mpqc.files import write_atomically
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
        """The table of this machine for `target` (empty if never measured here)."""
        print_ = fingerprint(target)
        folder = pathlib.Path(folder) if folder else target.path.parent / target.name
        path = folder / f"{fingerprint_id(print_)}.json"
        if not path.is_file():
            return cls(path, print_, {}, {})
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise MpqcError(f"latency table '{path}' is not valid JSON; delete it and run 'mpqc profile' again") from None
        if data.get("fingerprint") != print_:
            raise MpqcError(f"latency table '{path}' was measured on another machine, GPU or runtime; run 'mpqc profile' here")
        return cls(path, print_, data.get("entries", {}), data.get("models", {}))

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
