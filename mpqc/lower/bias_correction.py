"""Empirical bias correction (Nagel et al., 2019): remove the mean output shift that rounding the
weights causes, using each layer's mean input per channel on the proxy data.

Rounding errors do not average out: for a layer y = W x + b, E[y_q - y] = (W_q - W) E[x], and in
depthwise-heavy nets that shift compounds from layer to layer (benchmarks/examples.py measures
EfficientNet-Lite0 with and without it).
"""

from __future__ import annotations

import numpy as np

from mpqc.passes.layers import Layer


def output_shift(layer: Layer, weight: np.ndarray, dequantized: np.ndarray, input_mean: np.ndarray, groups: int = 1) -> np.ndarray:
    """Expected change of each output channel caused by replacing `weight` with `dequantized`."""
    error = dequantized.astype(np.float64) - weight.astype(np.float64)
    mean = input_mean.astype(np.float64)
    if layer.op_type == "Conv":
        out_channels, in_per_group = error.shape[:2]
        per_input = error.reshape(out_channels, in_per_group, -1).sum(axis=2)  # sum over the kernel window
        group_of = np.arange(out_channels) // (out_channels // groups)
        means = mean.reshape(groups, in_per_group)[group_of]  # the inputs each output channel sees
        return (per_input * means).sum(axis=1)
    # MatMul weights are (K, N); Gemm weights are (N, K) when transposed.
    if layer.channel_axis == 0:
        return error @ mean
    return mean @ error
