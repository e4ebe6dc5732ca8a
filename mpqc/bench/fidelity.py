"""How close a built model stays to its FP32 original."""

from __future__ import annotations

import numpy as np


def output_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Model-agnostic numbers for any output: relative L2 error, cosine, SQNR (dB)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    error = np.linalg.norm(ref - cand, axis=1)
    norm = np.linalg.norm(ref, axis=1)
    cosine = (ref * cand).sum(1) / np.maximum(norm * np.linalg.norm(cand, axis=1), 1e-30)
    noise = float(((ref - cand) ** 2).sum())
    return {
        "relative_l2_error": float((error / np.maximum(norm, 1e-30)).mean()),
        "cosine_mean": float(cosine.mean()),
        "sqnr_db": float(10 * np.log10(float((ref**2).sum()) / noise)) if noise > 0 else float("inf"),
    }
