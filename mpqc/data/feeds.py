"""Proxy data: load it and check it against the model's inputs before anything runs on it."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import onnx

from mpqc.errors import MpqcError

_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
           onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.UINT8: np.uint8}


def load_npz(path: str | pathlib.Path, only: str | None = None) -> dict[str, np.ndarray]:
    """The archive's arrays by name; with `only`, just that one (if present): an .npz reads lazily."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MpqcError(f"proxy data '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files if only is None or name == only}
    except Exception:
        raise MpqcError(f"proxy data '{path}' is not a readable .npz archive (arrays keyed by input name)") from None


def check_feeds(feeds: dict[str, np.ndarray], model: onnx.ModelProto, origin: str) -> dict[str, np.ndarray]:
    """Match names, dtypes and non-batch dims of the model's inputs; reject empty and non-finite data."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    missing = [i.name for i in inputs if i.name not in feeds]
    if missing:
        raise MpqcError(f"proxy data '{origin}' lacks input(s) {', '.join(missing)} (it has {', '.join(feeds) or 'nothing'})")
    checked, counts = {}, set()
    for info in inputs:
        array = np.asarray(feeds[info.name])
        tensor_type = info.type.tensor_type
        expected = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if array.ndim != len(expected) or any(e is not None and e != a for e, a in zip(expected[1:], array.shape[1:])):
            shown = "x".join("N" if e is None else str(e) for e in expected)
            raise MpqcError(f"proxy data '{origin}': input '{info.name}' has shape {array.shape}, the model wants {shown}")
        if array.shape[0] == 0:
            raise MpqcError(f"proxy data '{origin}': input '{info.name}' is empty; give at least one sample")
        want = _DTYPES.get(tensor_type.elem_type)
        if want is not None and array.dtype != want:
            if np.issubdtype(array.dtype, np.floating) != np.issubdtype(want, np.floating):
                raise MpqcError(f"proxy data '{origin}': input '{info.name}' is {array.dtype}, the model wants {np.dtype(want)}")
            array = array.astype(want)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise MpqcError(f"proxy data '{origin}': input '{info.name}' contains NaN or infinite values; clean the data")
        checked[info.name] = np.ascontiguousarray(array)
        counts.add(array.shape[0])
    if len(counts) > 1:
        raise MpqcError(f"proxy data '{origin}': inputs have different sample counts {sorted(counts)}")
    return checked


def feeds_sha256(feeds: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(feeds):
        digest.update(name.encode())
        digest.update(str(feeds[name].dtype).encode() + str(feeds[name].shape).encode())
        digest.update(np.ascontiguousarray(feeds[name]).tobytes())
    return digest.hexdigest()
