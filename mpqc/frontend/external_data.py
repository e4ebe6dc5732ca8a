"""Weights kept beside an ONNX file (external data): load them, or say which file is wrong and how."""

from __future__ import annotations

import pathlib

import onnx
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from mpqc.errors import MpqcError
from mpqc.frontend.messages import first_line


def load_external_data(model: onnx.ModelProto, path: pathlib.Path) -> None:
    """Read the external data of `model`, loaded from `path`, into it; onnx refuses locations outside
    the model's folder, symbolic links and short files, and we name the tensor and file it failed on."""
    folder = path.parent.resolve()
    try:
        load_external_data_for_model(model, str(folder))
    except Exception as exc:  # ValidationError, OSError, ValueError
        raise MpqcError(f"'{path}': {_reason(model, folder) or 'cannot read its external data: ' + first_line(exc)}") from None


def _reason(model: onnx.ModelProto, folder: pathlib.Path) -> str | None:
    """Why the first initializer still marked external failed, when the file system can tell.

    onnx loads tensors in order and unmarks each it loads, so that one is the one it failed on."""
    tensor = next((t for t in model.graph.initializer if uses_external_data(t)), None)
    if tensor is None:
        return None  # a tensor in a Constant or a subgraph: onnx's own message says which
    location = ExternalDataInfo(tensor).location
    target = folder / location
    if pathlib.PurePath(location).is_absolute() or not target.resolve().is_relative_to(folder):
        return (f"tensor '{tensor.name}' keeps its data at '{location}', outside the model's folder '{folder}'; "
                "mpqc reads external data only from beside the model: move the data there and re-save the model")
    if not target.exists():
        return (f"tensor '{tensor.name}' keeps its data in '{location}', which does not exist in '{folder}'; "
                "copy the data file beside the model")
    return None
