"""What every sensitivity method gets: the model (ONNX, and the torch module where there is one),
its quantizable layers, each layer's candidate precisions and the proxy data.

A method turns this into scores: (layer name, precision name) -> a non-negative number, where a
larger number means the layer loses more at that precision and fp32 scores 0. The ILP adds the
scores up, so they must be comparable across layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from mpqc.errors import MpqcError
from mpqc.passes.layers import Layer
from mpqc.sensitivity.defaults import INDICATOR_ITERATIONS, SEAM_TERMS
from mpqc.targets import Target

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class SensitivityContext:
    float_model: onnx.ModelProto  # canonicalized float model (BN folded), the one the lowering quantizes
    layers: list[Layer]
    candidates: Mapping[str, Sequence[str]]  # layer name -> precision names the ILP may choose
    target: Target
    feeds: dict[str, np.ndarray]  # proxy inputs keyed by model input name, N samples each
    input_names: tuple[str, ...]  # the order the torch module takes its inputs in
    # The float torch module the ONNX model was exported from (eval mode), or None for an .onnx
    # file. Layer names are its module names ("block1.conv1"; "name#1" for a module's second call).
    module: "torch.nn.Module | None" = None
    # Proxy labels, or None: trained methods then label each sample with the float model's argmax.
    labels: np.ndarray | None = None
    # True when the labels are classes of the model's own output (MNIST digits for an MNIST model);
    # False for labelled data of other classes, which needs a proxy head on the float features.
    labels_match_model: bool = True
    # False for models whose output is not class scores (sentence embeddings): methods then compare
    # outputs with the float model's instead of fitting labels.
    classifier: bool = True
    seed: int = 0
    # Indicator training (limpq, seam): an iteration budget, the same on any proxy size (a small
    # proxy is cycled through), and samples per iteration. Training stops earlier once the steps
    # have converged (mpqc.sensitivity.indicators).
    iterations: int = INDICATOR_ITERATIONS
    # Passes over the proxy data instead of an iteration budget (iterations = epochs x batches per
    # pass), where a caller still asks for epochs; None: `iterations` decides.
    epochs: int | None = None
    batch_size: int = 32
    gmpq: bool = False  # add the attribution-imitation (Grad-CAM) term to indicator training
    seam_terms: tuple[float, float, float] = SEAM_TERMS  # seam's (margin, compactness weight, margin weight)
    # LIMPQ fixes the first and last layer at 8 bits and does not search them. True: indicator
    # training holds them at their 8-bit candidate and their narrower candidates score
    # prohibitively; False: they train and are searched like every other layer.
    fixed_ends: bool = False
    # `output`: runs the model lowered with {layer: precision} (every other layer float) on the
    # proxy samples and returns its first output; the pipeline supplies it. `calibration` names
    # the lowering's calibration, which those outputs depend on.
    run_policy: "Callable[[Mapping[str, str]], np.ndarray] | None" = None
    calibration: str = ""

    def indicator_iterations(self) -> int:
        """The iteration budget of indicator training: `iterations`, or `epochs` passes over the proxy."""
        if self.epochs is None:
            return self.iterations
        per_pass = -(-self.sample_count // max(1, min(self.batch_size, self.sample_count)))
        return self.epochs * per_pass

    @property
    def sample_count(self) -> int:
        return len(next(iter(self.feeds.values())))

    def require_module(self, method: str) -> "torch.nn.Module":
        if self.module is None:
            raise MpqcError(
                f"--method {method} trains on the torch model, and this model came from an .onnx file: "
                "pass the model as package.module:factory (or a bundled example), or use --method output (the default) or qerror"
            )
        return self.module

    def layer_modules(self) -> dict[str, "torch.nn.Module"]:
        """Layer name -> the torch module that computes it (a module called twice serves both names)."""
        module = self.require_module("this")
        named = dict(module.named_modules())
        found = {}
        for layer in self.layers:
            owner = layer.name.split("#", 1)[0]
            if owner not in named:
                raise MpqcError(
                    f"layer '{layer.name}' has no torch module of that name: the model was not exported by mpqc "
                    "from this module, so trained sensitivity methods cannot map layers to modules"
                )
            found[layer.name] = named[owner]
        return found

    def batches(self, rng: np.random.Generator, batch_size: int | None = None,
                indices: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, tuple["torch.Tensor", ...]]]:
        """One pass over the proxy data (or `indices` of it) in a seeded order: (sample indices, inputs)."""
        import torch

        size = batch_size or self.batch_size
        order = rng.permutation(self.sample_count if indices is None else indices)
        for start in range(0, len(order), size):
            chosen = np.sort(order[start:start + size])
            yield chosen, tuple(torch.from_numpy(np.ascontiguousarray(self.feeds[n][chosen])) for n in self.input_names)

    def training_labels(self) -> np.ndarray:
        """The labels indicator training fits: the proxy's own, or the float model's predictions."""
        if self.labels is not None:
            return self.labels
        return float_predictions(self)


# The context's data: the score cache keys them by their hashes (model, proxy feeds, target lowering,
# candidates) or by what they are derived from (the module is the model's source). Every other
# field is a setting, and settings_of() puts all of them in the cache key.
DATA_FIELDS = ("float_model", "layers", "candidates", "target", "feeds", "input_names", "module", "labels", "run_policy")


def settings_of(context: SensitivityContext) -> dict:
    """Every setting the scores depend on, for the score cache key: all fields but DATA_FIELDS,
    and the labels' hash. A new field is a setting unless DATA_FIELDS says otherwise."""
    settings = {field.name: getattr(context, field.name) for field in dataclasses.fields(context)
                if field.name not in DATA_FIELDS}
    labels = context.labels
    settings["labels_sha256"] = None if labels is None else hashlib.sha256(np.ascontiguousarray(labels)).hexdigest()
    return settings


def float_predictions(context: SensitivityContext, batch_size: int = 64) -> np.ndarray:
    """Argmax of the float torch module over the proxy data (pseudo-labels for unlabelled proxies)."""
    import torch

    module = context.require_module("this")
    out = []
    with torch.no_grad():
        for start in range(0, context.sample_count, batch_size):
            inputs = tuple(torch.from_numpy(context.feeds[n][start:start + batch_size]) for n in context.input_names)
            logits = module(*inputs)
            if logits.dim() != 2:
                raise MpqcError(
                    f"trained sensitivity methods need a classifier (output of shape (N, classes)); this model's "
                    f"output has shape {tuple(logits.shape)}: use --method output (the default), qerror or hawq"
                )
            out.append(logits.argmax(dim=1).numpy())
    return np.concatenate(out).astype(np.int64)
