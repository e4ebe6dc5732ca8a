"""mpqc's INT4 storage layout, defined once for the lowering, the kernels and their tests.

Values are signed 4-bit integers in [-8, 7] (mpqc's quantizer only uses the narrow range [-7, 7],
so negating a weight never saturates). Two values share a byte: the first in the low nibble, the
second in the high nibble, each in two's complement. This is ONNX's INT4 packing, the bytes mpqc's
lowering writes for INT4 initializers (onnx_ir, DataType.INT4) and the layout TensorRT reads.

Packing runs along the last axis; an odd last axis is padded with a zero nibble, so each row
starts on a byte boundary and a kernel can address row n at byte n * ceil(K / 2). ONNX packs the
flattened tensor instead; both agree whenever the last axis is even, and for any shape
`pack_int4(x.reshape(-1))` gives ONNX's bytes.

Every function takes and returns numpy arrays or torch tensors alike (packed bytes are uint8).
"""

from __future__ import annotations

import numpy as np
import torch

INT4_MIN, INT4_MAX = -8, 7


def packed_length(n: int) -> int:
    """Bytes that hold n INT4 values."""
    return (n + 1) // 2


def pack_int4(values):
    """Integer array (..., n) with values in [-8, 7] -> uint8 array (..., ceil(n / 2))."""
    if isinstance(values, torch.Tensor):
        return _pack_torch(values)
    return _pack_numpy(np.asarray(values))


def unpack_int4(packed, n: int):
    """uint8 (or int8) array (..., ceil(n / 2)) -> int8 array (..., n) with values in [-8, 7]."""
    width = packed.shape[-1]
    if packed_length(n) != width:
        raise ValueError(f"{width} packed bytes per row hold {2 * width - 1} or {2 * width} INT4 values, not {n}")
    if isinstance(packed, torch.Tensor):
        return _unpack_torch(packed, n)
    return _unpack_numpy(np.asarray(packed), n)


def _check_range(low, high, dtype_name: str) -> None:
    if low < INT4_MIN or high > INT4_MAX:
        raise ValueError(f"INT4 values must lie in [{INT4_MIN}, {INT4_MAX}], got [{low}, {high}] ({dtype_name})")


def _pack_numpy(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind not in "iu":
        # ml_dtypes.int4 arrays (what onnx.numpy_helper returns) are integers too, but numpy
        # does not know it; anything else (floats) must be quantized first.
        if values.dtype.name != "int4":
            raise TypeError(f"pack_int4 needs an integer array, got {values.dtype}")
        values = values.astype(np.int8)
    if values.size:
        _check_range(int(values.min()), int(values.max()), str(values.dtype))
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), values.dtype)], axis=-1)
    # The low 4 bits of the two's complement form are the nibble; int16 avoids uint8 wrap warnings.
    nibbles = (values.astype(np.int16) & 0xF).astype(np.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _pack_torch(values: torch.Tensor) -> torch.Tensor:
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"pack_int4 needs an integer tensor, got {values.dtype}")
    if values.numel():
        _check_range(int(values.min()), int(values.max()), str(values.dtype))
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values.to(torch.int16), (0, 1))
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack_numpy(packed: np.ndarray, n: int) -> np.ndarray:
    packed = packed.view(np.uint8) if packed.dtype == np.int8 else packed.astype(np.uint8, copy=False)
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    # A nibble u in [0, 15] holds the signed value (u xor 8) - 8: 0..7 stay, 8..15 become -8..-1.
    return ((nibbles.astype(np.int8) ^ 8) - 8).astype(np.int8)


def _unpack_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    packed = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed.to(torch.uint8)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    return (nibbles.to(torch.int8) ^ 8) - 8
