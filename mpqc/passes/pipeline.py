"""The canonical pass pipeline every model goes through before analysis and lowering."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from mpqc.errors import MpqcError
from mpqc.frontend.messages import first_line
from mpqc.frontend.torch_export import MODULE_MAP_KEY
from mpqc.passes.check_weights import CheckWeightsPass
from mpqc.passes.fold_affine import FoldConvAffinePass
from mpqc.passes.fold_batchnorm import FoldBatchNormPass
from mpqc.passes.fold_input_affine import FoldConvInputAffinePass
from mpqc.passes.fold_weight_casts import FoldWeightCastsPass
from mpqc.passes.fuse_hardswish import FuseHardSwishPass
from mpqc.passes.lift_constants import LiftConstantWeightsPass


def canonical_passes() -> ir.passes.Sequential:
    return ir.passes.Sequential(
        LiftConstantWeightsPass(),  # first: the passes after it read weights as initializers
        FoldWeightCastsPass(),  # Cast/Identity of an initializer: a weight too
        CheckWeightsPass(),  # before folding, so a refusal names the model's own tensor
        FoldBatchNormPass(),
        FoldConvAffinePass(),  # after BatchNorm: a BN between the conv and its affine folds first
        FuseHardSwishPass(),
        FoldConvInputAffinePass(),  # after the output-side fold, which takes a conv -> affine -> conv chain first
        common.RemoveUnusedNodesPass(),
        # Exporters record stack traces with local paths: drop them so the bytes we write depend
        # only on the model, not on where it was built.
        common.ClearMetadataAndDocStringPass(),
        common.NameFixPass(),
    )


def canonicalize(model: onnx.ModelProto) -> ir.Model:
    module_map = {p.key: p.value for p in model.metadata_props}.get(MODULE_MAP_KEY)
    try:
        ir_model = ir.from_proto(model)
    except ir.serde.SerdeError as exc:  # what the ONNX checker lets through and onnx_ir cannot represent
        raise MpqcError(f"mpqc cannot read the model's graph: {first_line(_innermost(exc), with_type=True)}") from None
    try:
        # Folding extreme but finite BatchNorm parameters can overflow; find_layers refuses the
        # non-finite weights that makes, so numpy's warnings would only be noise.
        with np.errstate(over="ignore", invalid="ignore"):
            result = canonical_passes()(ir_model)
    except ir.passes.PassError as exc:  # a pass refused the model: the user needs its line, not the wrapper
        cause = exc
        while cause is not None and not isinstance(cause, MpqcError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
    if module_map is not None:
        result.model.metadata_props[MODULE_MAP_KEY] = module_map
    return result.model


def _innermost(exc: BaseException) -> BaseException:
    """onnx_ir wraps the real error once per level of the graph; the last one says what it was."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc
