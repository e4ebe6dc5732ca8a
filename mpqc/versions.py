"""Versions recorded in every build.json and latency table."""

from __future__ import annotations

import importlib.metadata
import platform


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("mpqc", "onnx", "onnx-ir", "onnxruntime", "numpy", "torch", "scipy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def machine() -> dict[str, object]:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system(), "arch": platform.machine()}
