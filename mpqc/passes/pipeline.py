"""The canonical pass pipeline every model goes through before analysis and lowering."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from mpqc.frontend.torch_export import MODULE_MAP_KEY
from mpqc.passes.fold_batchnorm import FoldBatchNormPass


def canonical_passes() -> ir.passes.Sequential:
    return ir.passes.Sequential(
        FoldBatchNormPass(),
        common.RemoveUnusedNodesPass(),
        # Exporters record stack traces with local paths: drop them so the bytes we write depend
        # only on the model, not on where it was built.
        common.ClearMetadataAndDocStringPass(),
        common.NameFixPass(),
    )


def canonicalize(model: onnx.ModelProto) -> ir.Model:
    module_map = {p.key: p.value for p in model.metadata_props}.get(MODULE_MAP_KEY)
    result = canonical_passes()(ir.from_proto(model))
    if module_map is not None:
        result.model.metadata_props[MODULE_MAP_KEY] = module_map
    return result.model
