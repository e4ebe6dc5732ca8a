"""The backend contract: a Runner runs one model, a Backend knows how its runtime is reached.

Backends are found by the target's `backend` name in BACKENDS (module -> its `BACKEND` object),
imported on use: a TensorRT target should not need TensorRT just to be named. A new runtime is one
package under mpqc/backends/ with a BACKEND object, plus one line here.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnx

from mpqc.bench.latency import LatencyStats, measure_latency
from mpqc.errors import MpqcError
from mpqc.targets import Target


class Runner(abc.ABC):
    """One loaded model: run feeds -> outputs, checked inputs; timed runs through measure_latency."""

    threads: int = 0  # intra-op threads of a CPU runtime, 0 where the device runs it
    fixed_batch: int | None = None  # a model whose batch dimension is fixed runs that many samples at a time

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs for one batch of inputs keyed by input name."""

    def run_batched(self, feeds: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
        """The first output over all samples, run in batches (evaluation sets do not fit one run)."""
        count = len(next(iter(feeds.values())))
        batch_size = self.fixed_batch or batch_size
        chunks = [
            self.run({name: array[start : start + batch_size] for name, array in feeds.items()})[0]
            for start in range(0, count, batch_size)
        ]
        return np.concatenate(chunks)

    def latency(self, feeds: dict[str, np.ndarray], warmup: int = 10, runs: int = 100) -> LatencyStats:
        """Whole runs on one batch, host to host, as a caller sees them."""
        return measure_latency(self, feeds, warmup, runs)


class Backend(Protocol):
    name: str
    # Whether `mpqc build` times models of this backend on the build machine; where it cannot, the
    # build measures fidelity on numerics_target() and says latency was not measured.
    measures_latency: bool
    # Whether the runtime has Q/DQ placement rules that `mpqc check` and every build enforce.
    has_rules: bool

    def load(self, model: bytes, target: Target) -> Runner:
        """A runner for a QDQ model built for `target`."""

    def fingerprint(self, target: Target) -> dict:
        """What a latency measurement on this runtime depends on besides the layer (names its table)."""

    def numerics_target(self, target: Target) -> Target:
        """The target whose runtime computes this target's models' numbers on this machine."""

    def violations(self, model: onnx.ModelProto, target: Target) -> Sequence:
        """The runtime's rule violations of a QDQ model (none where it has no rules)."""

    def artifacts(self, model: bytes, target: Target, policy, layers, batch: int,
                  tables: str | None) -> tuple[dict[str, bytes], dict | None]:
        """Files a build adds beside the QDQ model (an engine) and build.json's section on them."""


# target.backend -> the module holding its BACKEND.
BACKENDS = {
    "onnxruntime": "mpqc.backends.onnxruntime",
    "tensorrt": "mpqc.backends.tensorrt",
}


def runtime_target(target: Target) -> Target:
    """What runs a target's models on this machine: the target itself, or the runtime that computes
    its numerics here (as a build measures fidelity)."""
    backend = backend_for(target)
    return target if backend.measures_latency else backend.numerics_target(target)


def backend_for(target: Target) -> Backend:
    if target.backend not in BACKENDS:
        raise MpqcError(f"target '{target.name}' names backend '{target.backend}'; mpqc knows {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[target.backend]).BACKEND
