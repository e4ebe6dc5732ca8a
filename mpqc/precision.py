"""Precisions name what runs: weight format, activation format and granularity, not only a bit count."""

from __future__ import annotations

import dataclasses

from mpqc.errors import MpqcError


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    weight_bits: int | None  # None: weights stay float
    activation_bits: int | None  # None: activations stay float (weight-only or fp32)
    weight_granularity: str  # "none" | "channel" (per output channel) | "block" (block-wise along K)

    @property
    def is_float(self) -> bool:
        return self.weight_bits is None

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_bits is not None


FP32 = Precision("fp32", None, None, "none")
W8A8 = Precision("w8a8", 8, 8, "channel")
W4A8 = Precision("w4a8", 4, 8, "channel")
# INT4 weight-only, block-wise along the reduction axis: ONNX Runtime fuses DQ + MatMul into MatMulNBits.
W4A16 = Precision("w4a16", 4, None, "block")

PRECISIONS: dict[str, Precision] = {p.name: p for p in (FP32, W8A8, W4A8, W4A16)}


def precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        known = ", ".join(PRECISIONS)
        raise MpqcError(f"unknown precision '{name}': use one of {known}") from None
