"""Layer-wise comparison of two runs of one network: a reference (FP32) model and a candidate
(the QDQ model built from it), each with chosen intermediate tensors read out as extra outputs.

The lowering keeps the float tensor names of layer inputs and outputs (it only adds Q/DQ nodes
and tensors of its own), so one name is the same tensor in both models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from mpqc.bench.fidelity import output_agreement, sqnr_db
from mpqc.errors import MpqcError


def with_outputs(model: onnx.ModelProto, names: list[str], origin: str) -> tuple[bytes, tuple[str, ...]]:
    """A copy of `model` that also outputs the tensors `names`, and all its outputs' names in order."""
    probed = ir.from_proto(model)
    graph = probed.graph
    values = {value.name: value for node in graph for value in node.outputs} | {value.name: value for value in graph.inputs}
    missing = [name for name in names if name not in values]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MpqcError(f"{origin} has no tensor {', '.join(repr(n) for n in missing[:3])}{more}; "
                        "it was not built from this model")
    present = {value.name for value in graph.outputs}
    graph.outputs.extend(values[name] for name in dict.fromkeys(names) if name not in present)
    return ir.to_proto(probed).SerializeToString(), tuple(value.name for value in graph.outputs)


@dataclasses.dataclass(frozen=True)
class Probed:
    runner: object  # a Runner (mpqc.backends.base) of a model with_outputs made
    outputs: tuple[str, ...]  # that model's outputs, in the order run() returns them

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.runner.run(feeds)))


@dataclasses.dataclass
class _Sums:
    """Running sums over batches of one tensor's reference and candidate values."""

    signal: float = 0.0
    noise: float = 0.0
    cosine: float = 0.0
    relative_l2: float = 0.0
    samples: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if reference.shape != candidate.shape:
            raise MpqcError(f"a tensor has shape {candidate.shape} in the built model and {reference.shape} in the float "
                            "one; the build was not made from this model")
        ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
        self.signal += float((ref**2).sum())
        self.noise += float(((ref - cand) ** 2).sum())
        agreement = output_agreement(ref, cand)  # per sample, with the guards for all-zero rows
        self.cosine += agreement["cosine_mean"] * len(ref)
        self.relative_l2 += agreement["relative_l2_error"] * len(ref)
        self.samples += len(ref)

    def to_json(self) -> dict[str, float]:
        return {"sqnr_db": sqnr_db(self.signal, self.noise), "cosine_mean": self.cosine / self.samples,
                "relative_l2_error": self.relative_l2 / self.samples}


def batches(feeds: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    count = len(next(iter(feeds.values())))
    for start in range(0, count, size):
        yield {name: array[start : start + size] for name, array in feeds.items()}


def tensor_errors(reference: Probed, candidate: Probed, batched: Iterable[dict[str, np.ndarray]], names: list[str],
                  unprobed: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None = None
                  ) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Each tensor's error in the candidate against the reference over all batches: SQNR (dB, over
    all values), mean cosine and relative L2 error per sample (cosine and L2 guards per batch).

    `unprobed`: the candidate's run without extra outputs; the second result is then how far the
    probed candidate's first output lies from its own (a runtime may fuse differently once an
    intermediate tensor must be kept), None without it.
    """
    sums = {name: _Sums() for name in names}
    effect = _Sums() if unprobed is not None else None
    for feeds in batched:
        ref, cand = reference.run(feeds), candidate.run(feeds)
        for name in names:
            sums[name].add(ref[name], cand[name])
        if effect is not None:
            effect.add(unprobed(feeds)[0], cand[candidate.outputs[0]])
    return {name: total.to_json() for name, total in sums.items()}, (effect.to_json() if effect is not None else None)
