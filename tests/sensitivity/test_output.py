"""The `output` method on the bundled mnist-cnn: each score is the output error of the real lowered
model with that layer alone quantized, computed here independently through the build's own lowering."""

import numpy as np
import onnx_ir as ir
import pytest

from mpqc.backends.base import backend_for
from mpqc.data.proxy import proxy_feeds, proxy_labels
from mpqc.errors import MpqcError
from mpqc.lower.lowering import Lowering
from mpqc.passes.analysis import analyze
from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.search import OUTPUT_SAMPLES, candidates_of, sensitivity_context
from mpqc.policy import Policy
from mpqc.sensitivity.methods import scored_layers
from mpqc.targets import load_target


@pytest.fixture(scope="module")
def mnist():
    options = BuildOptions(model="mnist-cnn", proxy_limit=64)
    analysis = analyze("mnist-cnn")
    target = load_target("ort-cpu")
    feeds, _ = proxy_feeds(options.proxy_source(), analysis.loaded)
    labels = proxy_labels(options.proxy_source(), analysis.loaded, 64)
    context = sensitivity_context(analysis, target, ir.to_proto(analysis.model), feeds,
                                  candidates_of(analysis, target, evaluate_only=True), options, labels)
    return analysis, target, feeds, context, scored_layers("output", context)


def test_each_score_is_the_lowered_models_output_error_with_that_layer_alone_quantized(mnist):
    analysis, target, feeds, context, scored = mnist
    lowering = Lowering.prepare(analysis, target, feeds)
    samples = {name: array[:OUTPUT_SAMPLES] for name, array in feeds.items()}

    def run(chosen):
        policy = Policy(tuple((layer.name, chosen.get(layer.name, "fp32")) for layer in analysis.layers), "t")
        return backend_for(target).load(lowering.lower(policy), target).run_batched(samples).astype(np.float64)

    reference = run({})
    for layer, name in [(analysis.layers[0].name, "w8a8"), (analysis.layers[3].name, "w4a8")]:
        error = np.mean((run({layer: name}) - reference) ** 2) / np.mean(reference ** 2)
        assert scored.scores[(layer, name)] == pytest.approx(error, rel=1e-9)
    assert scored.details == {"lowered_policies": 1 + sum(len(n) - 1 for n in context.candidates.values()),
                              "samples": OUTPUT_SAMPLES}


def test_fp32_scores_nothing_and_four_bit_weights_cost_more_than_eight(mnist):
    _, _, _, context, scored = mnist
    assert set(scored.scores) == {(layer, p) for layer, names in context.candidates.items() for p in names}
    assert all(scored.scores[(layer, "fp32")] == 0.0 for layer in context.candidates)
    assert all(s >= 0 for s in scored.scores.values())
    worse = [scored.scores[(layer, "w4a8")] > scored.scores[(layer, "w8a8")] for layer in context.candidates]
    assert sum(worse) >= len(worse) - 1, worse


def test_output_without_a_backend_says_what_to_do(mnist):
    import dataclasses

    _, _, _, context, _ = mnist
    with pytest.raises(MpqcError, match="--method output lowers and runs the model"):
        scored_layers("output", dataclasses.replace(context, run_policy=None))
