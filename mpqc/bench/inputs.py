"""Inputs for timing a model file that came without data."""

from __future__ import annotations

import numpy as np
import onnx

from mpqc.errors import MpqcError


def synthetic_feeds(model: onnx.ModelProto, batch: int, seed: int = 0,
                    hint: str = "pass --data DATA.npz with real inputs") -> dict[str, np.ndarray]:
    """Fixed-seed inputs: normal floats, ones for integer inputs (valid ids and full attention masks)."""
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif axis == 0:
                shape.append(batch)
            else:
                raise MpqcError(f"input '{info.name}' has a symbolic dimension {axis}; {hint}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[info.name] = np.ones(shape, dtype=dtype)
    return feeds
