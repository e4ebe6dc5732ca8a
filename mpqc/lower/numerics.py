"""Symmetric quantization numerics shared by the lowering and the tests' references.

Every zero point is 0 (TensorRT accepts nothing else) and the integer range is narrow
([-127, 127] for INT8, [-7, 7] for INT4) so that negating a weight never saturates.
Rounding is half-to-even, as ONNX QuantizeLinear does.
"""

from __future__ import annotations

import numpy as np


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


# Below this a channel is treated as all zeros: its scale would underflow float32.
MIN_AMAX = np.float32(1e-30)


def _safe_scale(amax: np.ndarray, bits: int) -> np.ndarray:
    # An all-zero channel still needs a positive scale; any value dequantizes zeros exactly.
    amax = np.where(amax > MIN_AMAX, amax, 1.0)
    return (amax / qmax(bits)).astype(np.float32)


def per_channel_scales(weight: np.ndarray, channel_axis: int, bits: int) -> np.ndarray:
    reduce_axes = tuple(a for a in range(weight.ndim) if a != channel_axis)
    return _safe_scale(np.abs(weight).max(axis=reduce_axes), bits)


def blockwise_scales(weight: np.ndarray, block_axis: int, block_size: int, bits: int) -> np.ndarray:
    """Scales for blocks of `block_size` along `block_axis`; the last block may be short."""
    moved = np.moveaxis(np.abs(weight), block_axis, 0)
    blocks = -(-moved.shape[0] // block_size)
    amax = np.stack([moved[i * block_size : (i + 1) * block_size].max(axis=0) for i in range(blocks)])
    return np.moveaxis(_safe_scale(amax, bits), 0, block_axis)


def expand_scales(scales: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int | None) -> np.ndarray:
    """Broadcast per-channel or block-wise scales to the full weight shape."""
    if block_size is None:
        view = [1] * len(shape)
        view[axis] = -1
        return scales.reshape(view)
    return np.repeat(scales, block_size, axis=axis).take(range(shape[axis]), axis=axis)


def quantize(values: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Round-half-to-even and clip to the narrow symmetric range; returns int8 storage."""
    q = np.rint(values / scales)
    return np.clip(q, -qmax(bits), qmax(bits)).astype(np.int8)


def quantize_weight(
    weight: np.ndarray, bits: int, channel_axis: int, block_axis: int | None = None, block_size: int | None = None,
    min_scales: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(integer weight, scales): per output channel, or block-wise along `block_axis` when block_size is given.
    `min_scales` (per channel) raises the scales of channels whose weights are all but zero."""
    if block_size is None:
        scales = per_channel_scales(weight, channel_axis, bits)
        if min_scales is not None:
            scales = np.maximum(scales, min_scales).astype(np.float32)
        return quantize(weight, expand_scales(scales, weight.shape, channel_axis, None), bits), scales
    scales = blockwise_scales(weight, block_axis, block_size, bits)
    return quantize(weight, expand_scales(scales, weight.shape, block_axis, block_size), bits), scales


def activation_scale(amax: float, bits: int = 8) -> np.float32:
    return np.float32(_safe_scale(np.asarray(amax, dtype=np.float64), bits))


def activation_params(low: float, high: float, activation_type: str) -> tuple[np.float32, np.ndarray]:
    """(scale, zero point) of a per-tensor activation quantizer for the range [low, high].

    "int8": symmetric, zero point 0 (TensorRT's only form). "uint8": asymmetric over [min(low, 0),
    max(high, 0)]; a ReLU/ReLU6 output then gets zero point 0, which lets ONNX Runtime drop the
    clamp and chain its integer kernels.
    """
    if activation_type == "int8":
        return activation_scale(max(abs(low), abs(high))), np.zeros((), dtype=np.int8)
    low, high = min(low, 0.0), max(high, 0.0)
    if high - low <= MIN_AMAX:
        return np.float32(1.0), np.zeros((), dtype=np.uint8)
    scale = np.float32((high - low) / 255.0)
    zero_point = np.clip(np.rint(-low / float(scale)), 0, 255)
    return scale, np.array(zero_point, dtype=np.uint8)
