"""How close a built model stays to its FP32 original."""

from __future__ import annotations

import numpy as np

# A sample whose reference output is this much smaller than the typical sample's is judged on the
# typical scale: an all-zero row of a probability map has no relative error of its own to speak of.
_SCALE_FLOOR = 1e-3


def output_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Model-agnostic numbers for any output: relative L2 error, cosine, SQNR (dB).

    Per sample, with two guards that keep them sound on outputs that are mostly zeros: the relative
    error's denominator is at least _SCALE_FLOOR x the RMS sample norm, and two (numerically) zero
    rows agree (cosine 1). Identical outputs give 0, 1 and infinite SQNR.
    """
    ref, cand, norm, floor = _rows(reference, candidate)
    error = np.linalg.norm(ref - cand, axis=1)
    return {
        "relative_l2_error": float((error / np.maximum(norm, floor)).mean()),
        "cosine_mean": float(_cosines(ref, cand, norm, floor).mean()),
        "sqnr_db": sqnr_db(float((ref**2).sum()), float(((ref - cand) ** 2).sum())),
    }


def per_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The cosine of each sample's output, with output_agreement's guards; its mean is cosine_mean."""
    return _cosines(*_rows(reference, candidate))


def _cosines(ref: np.ndarray, cand: np.ndarray, norm: np.ndarray, floor: float) -> np.ndarray:
    """Per-row cosine of _rows' outputs; two rows under the floor agree (1)."""
    cand_norm = np.linalg.norm(cand, axis=1)
    both_zero = (norm < floor) & (cand_norm < floor)
    cosine = np.where(both_zero, 1.0, (ref * cand).sum(1) / np.maximum(norm * cand_norm, floor**2))
    return np.clip(cosine, -1.0, 1.0)


def _rows(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Both outputs as float64 rows, the reference rows' norms and the norm floor below which a row counts as zero."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    norm = np.linalg.norm(ref, axis=1)
    scale = float(np.sqrt(np.mean(norm**2))) if len(norm) else 0.0
    return ref, cand, norm, max(_SCALE_FLOOR * scale, 1e-30)


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) from sums of squares: infinite for no noise, -infinite for no signal."""
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")
