"""Activation ranges on proxy data, streamed batch by batch so memory stays flat.

`minmax` keeps the smallest and largest value seen. `percentile` takes a second pass: a histogram
of |x| over [0, max|x|] per tensor, and clips the range to the magnitude below which `percentile`%
of all entries fall, which ignores the rare outliers that would otherwise stretch the INT8 grid.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from mpqc.errors import MpqcError
from mpqc.frontend.shapes import fixed_batch

METHODS = ("minmax", "percentile")
_BINS = 2048


def calibrate(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: dict[str, np.ndarray],
    method: str = "minmax",
    percentile: float = 99.99,
    batch_size: int = 16,
) -> dict[str, tuple[float, float]]:
    """Per-tensor (low, high) of `tensors` when the float model runs on `feeds`."""
    if method not in METHODS:
        raise MpqcError(f"unknown calibration method '{method}': use one of {', '.join(METHODS)}")
    if not tensors:
        return {}
    session = _session_with_outputs(model, tensors)
    low = {name: 0.0 for name in tensors}
    high = {name: 0.0 for name in tensors}
    for outputs in _run(session, tensors, feeds, batch_size):
        for name, value in zip(tensors, outputs):
            if value.size:
                low[name] = min(low[name], float(value.min()))
                high[name] = max(high[name], float(value.max()))
    if method == "minmax":
        return {name: (low[name], high[name]) for name in tensors}
    amax = {name: max(-low[name], high[name]) for name in tensors}
    hist = {name: np.zeros(_BINS, dtype=np.int64) for name in tensors}
    for outputs in _run(session, tensors, feeds, batch_size):
        for name, value in zip(tensors, outputs):
            if amax[name] > 0:
                hist[name] += np.histogram(np.abs(value), bins=_BINS, range=(0.0, amax[name]))[0]
    ranges = {}
    for name in tensors:
        edge = _percentile_edge(hist[name], amax[name], percentile)
        ranges[name] = (max(low[name], -edge), min(high[name], edge))
    return ranges


def _percentile_edge(hist: np.ndarray, amax: float, percentile: float) -> float:
    if amax == 0 or hist.sum() == 0:
        return amax
    cumulative = np.cumsum(hist) / hist.sum()
    index = int(np.searchsorted(cumulative, percentile / 100.0))
    return float(amax * min(index + 1, _BINS) / _BINS)


def _session_with_outputs(model: onnx.ModelProto, tensors: list[str]) -> ort.InferenceSession:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in tensors:
        if name not in existing:
            augmented.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, tensors: list[str], feeds: dict[str, np.ndarray], batch_size: int):
    count = len(next(iter(feeds.values())))
    batch_size = fixed_batch(session.get_inputs()) or batch_size
    for start in range(0, count, batch_size):
        batch = {name: array[start : start + batch_size] for name, array in feeds.items()}
        yield session.run(tensors, batch)


def run_tensors(model: onnx.ModelProto, tensors: list[str], feeds: dict[str, np.ndarray], batch_size: int = 16):
    """The float model run on `feeds` batch by batch, yielding {tensor name: value} for `tensors`."""
    session = _session_with_outputs(model, tensors)
    for outputs in _run(session, tensors, feeds, batch_size):
        yield dict(zip(tensors, outputs))


def channel_means(
    model: onnx.ModelProto, tensors: dict[str, int], feeds: dict[str, np.ndarray], batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Mean of each tensor over every axis but its channel axis (`tensors` maps name -> channel axis)."""
    if not tensors:
        return {}
    names = list(tensors)
    session = _session_with_outputs(model, names)
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(names, 0)
    for outputs in _run(session, names, feeds, batch_size):
        for name, value in zip(names, outputs):
            moved = np.moveaxis(value, tensors[name], -1).reshape(-1, value.shape[tensors[name]])
            sums[name] = sums.get(name, 0.0) + moved.sum(axis=0, dtype=np.float64)
            counts[name] += moved.shape[0]
    return {name: sums[name] / counts[name] for name in names}
