"""Load an ONNX file a user hands us: check it, bring it to opset 21, infer shapes."""

from __future__ import annotations

import pathlib

import onnx
import onnx.numpy_helper
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import Message
from onnx_ir.passes import common

from mpqc.errors import MpqcError
from mpqc.frontend.external_data import load_external_data
from mpqc.frontend.messages import first_line
from mpqc.frontend.support import check_input_sizes

MIN_OPSET = 21  # INT4 Q/DQ and block-wise DequantizeLinear need opset 21
PROTOBUF_LIMIT = 2**31  # bytes: no protobuf message (mpqc holds a model as one) can be larger
DEFAULT_DOMAINS = ("", "ai.onnx")


def load_onnx_file(path: str | pathlib.Path) -> onnx.ModelProto:
    model = prepare(read_onnx_file(path), str(path))
    check_input_sizes(model, str(path))
    return model


def read_onnx_file(path: str | pathlib.Path) -> onnx.ModelProto:
    """The model exactly as the file holds it (no upgrade, no shape inference)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MpqcError(f"model file '{path}' does not exist")
    if path.stat().st_size >= PROTOBUF_LIMIT:
        raise MpqcError(_too_large(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises DecodeError and friends on a damaged file
        raise MpqcError(f"'{path}' is not a readable ONNX model (corrupt or not ONNX); re-export it") from None
    load_external_data(model, path)
    return model


def prepare(model: onnx.ModelProto, origin: str) -> onnx.ModelProto:
    """Validate, upgrade to opset >= 21 and run shape inference."""
    check_valid(model, origin)
    _open_negative_dims(model)
    opset = _default_opset(model, origin)
    if 0 < opset < MIN_OPSET:  # 0: no default-domain ops, nothing to convert
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise MpqcError(f"'{origin}' uses opset {opset} and could not be converted to {MIN_OPSET}: {first_line(exc)}") from None
    if model.ir_version < 4:
        model = _without_initializer_inputs(model)
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise MpqcError(f"shape inference failed on '{origin}': {first_line(exc)}") from None


def check_valid(model: onnx.ModelProto, origin: str) -> None:
    """The ONNX checker's verdict as one MpqcError line."""
    if model.ByteSize() >= PROTOBUF_LIMIT:  # weights read from external data count too
        raise MpqcError(_too_large(origin))
    field = _non_utf8_field(model)
    if field is not None:
        raise MpqcError(f"'{origin}' is damaged: the text in {field} is not UTF-8; re-export the model")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError, and whatever else the C++ checker lets through
        raise MpqcError(f"'{origin}' is not a valid ONNX model: {first_line(exc)}") from None
    tensor = _tensor_unlike_its_shape(model)
    if tensor is not None:
        raise MpqcError(f"'{origin}' is damaged: tensor '{tensor}' holds another number of values than its shape says; "
                        "re-export the model")


def _tensor_unlike_its_shape(model: onnx.ModelProto) -> str | None:
    """The first weight whose data does not fill its dims (the checker does not look; a flipped bit
    in a dim does it). Weights held in external files are checked once they are loaded."""
    tensors = list(model.graph.initializer) + [
        attribute.t for node in model.graph.node if node.op_type == "Constant"
        for attribute in node.attribute if attribute.type == attribute.TENSOR]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            onnx.numpy_helper.to_array(tensor)
        except Exception:  # ValueError on a reshape, or an unknown data type
            return tensor.name
    return None


def _open_negative_dims(model: onnx.ModelProto) -> None:
    """A dimension written as -1 (older TensorFlow and Keras converters mean "any size" by it; the
    checker lets it through) becomes a named open dimension, which is how ONNX says that."""
    graph = model.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = f"{info.name}_dim{axis}"


def _too_large(origin) -> str:
    return (f"'{origin}' is 2 GiB or more with its weights; mpqc holds a model as one protobuf message, "
            "which cannot be that large")


def _default_opset(model: onnx.ModelProto, origin: str) -> int:
    versions = sorted({o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS})
    if len(versions) > 1:
        raise MpqcError(f"'{origin}' imports the default ONNX domain at several opsets ({', '.join(map(str, versions))}); "
                        "keep one opset_import entry for it")
    newest = onnx.defs.onnx_opset_version()
    if versions and versions[0] > newest:
        raise MpqcError(f"'{origin}' uses opset {versions[0]}, newer than the newest this onnx {onnx.__version__} knows "
                        f"({newest}); re-export it with opset {newest} or older")
    return versions[0] if versions else 0


def _without_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR 3 lists every initializer as a graph input, and the checker wants every initializer the
    lowering adds listed too; from IR 4 on a listed initializer is an input users may override, which
    these never were. So: unlist them and stamp the IR version the opsets need."""
    converted = ir.from_proto(model)
    common.RemoveInitializersFromInputsPass()(converted)
    converted.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return ir.to_proto(converted)


def _non_utf8_field(message: Message, where: str = "") -> str | None:
    """Where the first text is that is not UTF-8: protobuf hands such string fields back as bytes,
    which the checker and onnx_ir then fail on with a traceback; string attributes are bytes fields
    that the ONNX spec says hold UTF-8."""
    if isinstance(message, onnx.AttributeProto) and message.type in (message.STRING, message.STRINGS):
        for index, text in enumerate([message.s] if message.type == message.STRING else message.strings):
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                return f"{where}s" if message.type == message.STRING else f"{where}strings[{index}]"
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        repeated = not isinstance(value, (str, bytes, Message))
        for index, item in enumerate(value if repeated else [value]):
            path = f"{where}{field.name}" + (f"[{index}]" if repeated else "")
            if field.type == field.TYPE_STRING:
                if isinstance(item, bytes):
                    return path
            else:
                found = _non_utf8_field(item, path + ".")
                if found is not None:
                    return found
    return None
