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


# CPU features that pick ONNX Runtime's INT8 kernels. Two CPUs of one model name can differ here
# (virtual machines hide features): without VNNI, u8s8 kernels run on AVX2's 16-bit saturating
# multiply-adds, which is slower and, for weights near +-127, inexact.
INT8_FEATURES = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def machine() -> dict[str, object]:
    import os

    fields: dict[str, str] = {}  # the first processor's /proc/cpuinfo entries
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system(), "arch": platform.machine(),
            "int8_features": [feature for feature in INT8_FEATURES if feature in flags]}


def provenance() -> dict[str, object]:
    """The date, package versions and machine: what every benchmark result records of its making."""
    import time

    return {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "machine": machine()}
