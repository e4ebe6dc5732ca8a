"""Load an ONNX file a user hands us: check it, bring it to opset 21, infer shapes."""

from __future__ import annotations

import pathlib

import onnx
import onnx.version_converter

from mpqc.errors import MpqcError

MIN_OPSET = 21  # INT4 Q/DQ and block-wise DequantizeLinear need opset 21


def load_onnx_file(path: str | pathlib.Path) -> onnx.ModelProto:
    return prepare(read_onnx_file(path), str(path))


def read_onnx_file(path: str | pathlib.Path) -> onnx.ModelProto:
    """The model exactly as the file holds it (no upgrade, no shape inference)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MpqcError(f"model file '{path}' does not exist")
    try:
        return onnx.load(str(path))
    except Exception:  # protobuf raises DecodeError and friends on a damaged file
        raise MpqcError(f"'{path}' is not a readable ONNX model (corrupt or not ONNX); re-export it") from None


def prepare(model: onnx.ModelProto, origin: str) -> onnx.ModelProto:
    """Validate, upgrade to opset >= 21 and run shape inference."""
    check_valid(model, origin)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise MpqcError(f"'{origin}' uses opset {opset} and could not be converted to {MIN_OPSET}: {exc}") from None
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        raise MpqcError(f"shape inference failed on '{origin}': {first}") from None


def check_valid(model: onnx.ModelProto, origin: str) -> None:
    """The ONNX checker's verdict as one MpqcError line."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MpqcError(f"'{origin}' is not a valid ONNX model: {first}") from None
