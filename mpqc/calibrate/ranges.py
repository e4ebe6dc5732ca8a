"""Activation ranges on proxy data, streamed batch by batch so memory stays flat.

`minmax` keeps the smallest and largest value seen. `percentile` takes a second pass: a histogram
of |x| over [0, max|x|] per tensor, and clips the range to the magnitude below which `percentile`%
of all entries fall, which ignores the rare outliers that would otherwise stretch the INT8 grid.
`mse` takes the same second pass with a histogram of x over [min, max] and picks, among ranges
whose ends shrink towards zero by factors in [0.2, 1] (each end its own), the one whose 8-bit
grid gives the least expected squared error (step^2/12 for a value inside the range, the squared
distance to the range for one outside it): a wider range rounds every value more coarsely, a
narrower one clips more of them. A non-finite range is returned as it is, for the caller to refuse.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from mpqc.errors import MpqcError
from mpqc.frontend.shapes import fixed_batch

METHODS = ("minmax", "percentile", "mse")
_BINS = 2048
_LEVELS = 255  # steps of an 8-bit grid
_SHRINKS = np.linspace(0.2, 1.0, 81)  # candidate range factors for `mse`, in steps of 0.01


def calibrate(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: dict[str, np.ndarray],
    method: str = "minmax",
    percentile: float = 99.99,
    batch_size: int = 16,
    grid: str = "uint8",
) -> dict[str, tuple[float, float]]:
    """Per-tensor (low, high) of `tensors` when the float model runs on `feeds`. `grid` is the
    target's activation type, the grid `mse` measures its error on."""
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
    if method == "mse":
        return _least_error_ranges(session, tensors, feeds, batch_size, low, high, grid)
    amax = {name: max(-low[name], high[name]) for name in tensors}
    hist = _histograms(session, tensors, feeds, batch_size, {name: (0.0, amax[name]) for name in tensors}, magnitude=True)
    ranges = {}
    for name in tensors:
        edge = _percentile_edge(hist[name], amax[name], percentile)
        ranges[name] = (max(low[name], -edge), min(high[name], edge))
    return ranges


def _least_error_ranges(session, tensors, feeds, batch_size, low, high, grid) -> dict[str, tuple[float, float]]:
    hist = _histograms(session, tensors, feeds, batch_size, {name: (low[name], high[name]) for name in tensors}, magnitude=False)
    return {name: least_error_range(hist[name], low[name], high[name], grid) for name in tensors}


def _histograms(session, tensors, feeds, batch_size, spans: dict[str, tuple[float, float]], magnitude: bool) -> dict[str, np.ndarray]:
    """The second pass: per tensor, a histogram of _BINS bins of x (of |x| with `magnitude`) over
    its span. An empty or non-finite span stays all zeros, and its tensor keeps its first-pass range."""
    hist = {name: np.zeros(_BINS, dtype=np.int64) for name in tensors}
    for outputs in _run(session, tensors, feeds, batch_size):
        for name, value in zip(tensors, outputs):
            start, end = spans[name]
            if end > start and np.isfinite([start, end]).all():
                hist[name] += np.histogram(np.abs(value) if magnitude else value, bins=_BINS, range=(start, end))[0]
    return hist


def least_error_range(hist: np.ndarray, low: float, high: float, grid: str = "uint8") -> tuple[float, float]:
    """The range (low x a, high x b), a and b in _SHRINKS, whose 8-bit grid has the least expected
    squared error over `hist` (a histogram of _BINS bins over [low, high]); the widest where several
    tie. The grid is the one the lowering builds from a range (mpqc.lower.numerics.activation_params):
    "uint8" asymmetric, each end shrinking on its own and the zero point rounded to an integer, which
    moves both ends; "int8" symmetric over the larger magnitude."""
    if not high > low or hist.sum() == 0 or not np.isfinite([low, high]).all():
        return low, high
    width = (high - low) / _BINS
    centers = low + (np.arange(_BINS) + 0.5) * width
    counts = hist.astype(np.float64)
    # Prefix sums of count, sum and sum of squares: the clipping error beyond any point in O(1).
    n, s1, s2 = (np.concatenate([[0.0], np.cumsum(counts * centers**k)]) for k in (0, 1, 2))
    if grid == "int8":
        amax = max(-low, high) * _SHRINKS
        candidates = grid_low, grid_high = (-amax, amax)  # symmetric: the grid's ends are the range's
        scale = amax / 127
    else:
        lows, highs = np.meshgrid(min(low, 0.0) * _SHRINKS, max(high, 0.0) * _SHRINKS, indexing="ij")
        candidates = (lows, highs)
        scale = (highs - lows) / 255
        zero = np.clip(np.rint(-lows / scale), 0, 255)
        grid_low, grid_high = -zero * scale, (255 - zero) * scale
    below = np.searchsorted(centers, grid_low, side="left")
    inside_end = np.searchsorted(centers, grid_high, side="right")
    below_error = grid_low**2 * n[below] - 2 * grid_low * s1[below] + s2[below]
    above_error = (s2[-1] - s2[inside_end]) - 2 * grid_high * (s1[-1] - s1[inside_end]) + grid_high**2 * (n[-1] - n[inside_end])
    # A bin's values spread over its width: rounding never beats the histogram's own resolution.
    rounding = (n[inside_end] - n[below]) * (scale**2 + width**2) / 12
    errors = (rounding + below_error + above_error).ravel()
    best = np.flatnonzero(errors <= errors.min() * (1 + 1e-9) + 1e-300)[-1]  # the widest: factors ascend
    return float(candidates[0].ravel()[best]), float(candidates[1].ravel()[best])


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
