"""Proxy data: load it and check it against the model's inputs before anything runs on it."""

from __future__ import annotations

import hashlib
import math
import pathlib
import zipfile

import numpy as np
import onnx

from mpqc.errors import MpqcError

_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
           onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.UINT8: np.uint8}

# The most bytes of arrays one load may expand to, as the archive declares them (zip members and
# .npy headers), checked before anything is unpacked. Proxy data is calibration samples: hundreds
# to a few thousand, megabytes for the bundled examples. 4 GiB is far above that and still fits
# in memory beside the activations a calibration holds.
MAX_PROXY_BYTES = 4 * 2**30
# The largest magnitude a proxy value may have. Sensitivity and calibration statistics square
# activations and sum them in float32: a square overflows above sqrt(float32 max) ~ 1.8e19, and
# sums and the layers' own gains need headroom beyond that; 1e6 of it gives ~1.8e13. No real model
# input (pixels, normalized features, embeddings) comes near it. float32 max / 1e6 (3.4e32)
# would let 3.4e32 through, whose square is already inf.
MAX_PROXY_MAGNITUDE = float(np.sqrt(np.finfo(np.float32).max)) / 1e6


def load_npz(path: str | pathlib.Path, only: str | None = None) -> dict[str, np.ndarray]:
    """The archive's arrays by name; with `only`, just that one (if present): an .npz reads lazily.

    Sizes are checked from the zip and .npy headers before any data is read, so a small archive
    that expands to gigabytes is refused, not unpacked; no pickles; only finite values of sane size.
    """
    path = pathlib.Path(path)
    try:
        if not path.is_file():
            raise MpqcError(f"proxy data '{path}' does not exist")
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy") and only in (None, _array_name(m))]
            _check_declared_sizes(archive, members, path)
            arrays = {_array_name(m): _read_array(archive, m) for m in members}
    except MpqcError:
        raise
    except Exception as exc:  # zipfile, zlib and numpy raise many kinds on a truncated or damaged file
        raise MpqcError(f"proxy data '{path}' is not a readable .npz archive (arrays keyed by input name): "
                        f"{_reason(exc)}; write it again with numpy.savez") from None
    for name, array in arrays.items():
        _check_values(array, name, path)
    return arrays


def _array_name(member: zipfile.ZipInfo) -> str:
    return member.filename.removesuffix(".npy")  # numpy.savez stores array "x" as member "x.npy"


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_declared_sizes(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], path: pathlib.Path) -> None:
    """Refuse by the sizes the archive declares: its zip members' and their .npy headers'."""
    total = sum(m.file_size for m in members)
    if total > MAX_PROXY_BYTES:
        raise MpqcError(f"proxy data '{path}' expands to {_size(total)}, over mpqc's "
                        f"{_size(MAX_PROXY_BYTES)} bound for proxy data; use fewer samples")
    for member in members:
        name = _array_name(member)
        with archive.open(member) as stream:
            shape, dtype, offset = _npy_header(stream, name, path)
        if dtype.hasobject:
            raise MpqcError(f"proxy data '{path}': array {name!r} holds Python objects (a pickle), which mpqc "
                            f"does not load; save plain numeric arrays")
        declared = math.prod(shape) * dtype.itemsize  # Python ints: a forged shape cannot overflow
        if declared != member.file_size - offset:
            raise MpqcError(f"proxy data '{path}': array {name!r} declares {declared} bytes of data but its "
                            f"archive member holds {member.file_size - offset}; write it again with numpy.savez")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def _npy_header(stream, name: str, path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes before the data) from a .npy header, without reading the data."""
    try:
        version = np.lib.format.read_magic(stream)
    except ValueError:
        raise MpqcError(f"proxy data '{path}': member {name!r} is not a .npy array; save arrays with numpy.savez") from None
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:  # 3.0 only adds UTF-8 field names of structured arrays, which no model input is
        raise MpqcError(f"proxy data '{path}': array {name!r} is .npy format {version[0]}.{version[1]}; "
                        f"save plain arrays with numpy.savez")
    return shape, dtype, stream.tell()


def _read_array(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> np.ndarray:
    # The header declared exactly the member's size, so reading the data reaches its end, where
    # zipfile checks the CRC: a flipped bit in the data is refused, not loaded.
    with archive.open(member) as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def _check_values(array: np.ndarray, name: str, path: pathlib.Path) -> None:
    """Finite floats within MAX_PROXY_MAGNITUDE; min and max make no copy of a large array."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        return
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise MpqcError(f"proxy data '{path}': array {name!r} contains NaN or infinite values; clean the data")
    if max(-low, high) > MAX_PROXY_MAGNITUDE:
        raise MpqcError(f"proxy data '{path}': array {name!r} has values up to {max(-low, high):.3g}, over mpqc's "
                        f"bound of {MAX_PROXY_MAGNITUDE:.3g} for proxy data; rescale it as the model's inputs are")


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
