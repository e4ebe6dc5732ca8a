"""limpq / seam indicator training on the bundled mnist-cnn: the LSQ quantizer's numbers, the scores'
shape and order, determinism, the untouched user module, seam's margin terms, the proxy head, the
GMPQ attribution term and LIMPQ's outlier rule."""

import copy
import dataclasses
import math
import textwrap

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mpqc.data.mnist import mnist_split
from mpqc.passes.analysis import analyze
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.gradcam import attribution_loss, grad_cam, last_spatial_conv
from mpqc.sensitivity.indicators import (
    PROHIBITIVE,
    QuantizedCopy,
    measure_float_model,
    scores_from_steps,
    train_indicators,
    unreliable_bits,
)
from mpqc.sensitivity.lsq import LsqQuantizer, lsq_fake_quantize
from mpqc.sensitivity.margin import compactness_loss, margin_cross_entropy, train_proxy_head
from mpqc.sensitivity.methods import score_layers
from mpqc.targets import load_target

SAMPLES = 256  # 8 steps of 32 per epoch: enough to move every step, quick on two cores


@pytest.fixture(scope="module")
def mnist():
    analysis = analyze("mnist-cnn")
    target = load_target("ort-cpu")
    candidates = {
        layer.name: [p.name for p in target.precisions_for(layer.op_type, deployable_only=False)] for layer in analysis.layers
    }
    images, labels = mnist_split("train")
    return SensitivityContext(
        float_model=ir.to_proto(analysis.model),
        layers=analysis.layers,
        candidates=candidates,
        target=target,
        feeds={"image": images[:SAMPLES]},
        input_names=tuple(analysis.loaded.input_names),
        module=analysis.loaded.module,
        labels=labels[:SAMPLES],
        epochs=1,
    )


@pytest.fixture(scope="module")
def limpq(mnist):
    before = copy.deepcopy(mnist.module.state_dict())
    result = train_indicators(mnist, regularize=False, gmpq=False)
    return result, before


# --- LSQ quantizer ---------------------------------------------------------------------------------


def test_lsq_forward_is_round_clamp_scale():
    x = torch.linspace(-3.0, 3.0, 101)
    step = torch.tensor(0.07)
    expected = torch.clamp(torch.round(x / step), -7, 7) * step
    assert torch.equal(lsq_fake_quantize(x, step, -7, 7, 1.0), expected)


def test_lsq_gradients_match_the_lsq_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 6) * 0.5
    x.requires_grad_(True)
    quantizer = LsqQuantizer.for_weight(4)
    quantizer.initialize(0.2)  # a step small enough that some of x clips
    upstream = torch.randn(5, 6)
    quantizer(x).backward(upstream)

    s = quantizer.step.item()
    v = x.detach() / s
    inside = (v >= -7) & (v <= 7)
    per_element = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), -7, 7))
    g = 1.0 / math.sqrt(x.numel() * 7)
    assert (~inside).any() and inside.any()  # both branches of the formula are exercised
    assert float(quantizer.step.grad) == pytest.approx(float((upstream * per_element).sum()) * g, rel=1e-5)
    assert torch.equal(x.grad, upstream * inside)


def test_lsq_ranges_initial_step_and_activation_gradient_scale():
    weight, unsigned, signed = LsqQuantizer.for_weight(8), LsqQuantizer.for_activation(8, False), LsqQuantizer.for_activation(4, True)
    assert (weight.qmin, weight.qmax) == (-127, 127)
    assert (unsigned.qmin, unsigned.qmax) == (0, 255)
    assert (signed.qmin, signed.qmax) == (-7, 7)
    unsigned.initialize(0.5)
    assert unsigned.step.item() == pytest.approx(2 * 0.5 / math.sqrt(255))
    batch = torch.rand(4, 3, 5, 5)
    assert unsigned.grad_scale(batch) == pytest.approx(1 / math.sqrt(75 * 255))  # features of one sample
    assert weight.grad_scale(batch) == pytest.approx(1 / math.sqrt(300 * 127))  # the whole tensor


def test_activation_quantizers_are_unsigned_after_relu_and_signed_on_the_image(mnist):
    quantized = QuantizedCopy.create(mnist)
    reference = measure_float_model(mnist, quantized, with_features=False, attribution_module=None)
    quantized.initialize_steps(reference.inputs)
    assert quantized.quantizers["stem.conv"].activation["8"].signed  # normalised pixels go negative
    assert not quantized.quantizers["block1.conv1"].activation["8"].signed  # after a ReLU
    np.testing.assert_array_equal(reference.predictions, _float_argmax(mnist))


SHARED = textwrap.dedent(
    """
    import torch

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.mid = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            y = torch.relu(self.mid(torch.relu(self.mid(y))))
            return self.fc(y.mean((2, 3)))

    def make():
        torch.manual_seed(0)
        return Shared().eval(), torch.randn(1, 3, 8, 8)
    """
)


def test_a_module_called_twice_gets_quantizers_per_call(tmp_path, monkeypatch):
    (tmp_path / "sharednet.py").write_text(SHARED)
    monkeypatch.syspath_prepend(str(tmp_path))
    analysis = analyze("sharednet:make")
    assert [layer.name for layer in analysis.layers] == ["conv1", "mid", "mid#1", "fc"]
    target = load_target("ort-cpu")
    x = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    context = SensitivityContext(
        float_model=ir.to_proto(analysis.model), layers=analysis.layers,
        candidates={"conv1": ["fp32", "w8a8", "w4a8"], "mid": ["fp32", "w8a8", "w4a8"], "mid#1": ["fp32"], "fc": ["fp32", "w8a8"]},
        target=target, feeds={"input": x}, input_names=("input",), module=analysis.loaded.module, epochs=1, batch_size=16,
    )
    result = train_indicators(context, regularize=True, gmpq=False)
    module = analysis.loaded.module
    with torch.no_grad():
        first = torch.relu(module.conv1(torch.from_numpy(x)))
        second = torch.relu(module.mid(first))
    # Each call saw its own input: the second call is not mistaken for the first.
    assert result.activation_rms["mid"] == pytest.approx(float(first.pow(2).mean().sqrt()), rel=1e-5)
    assert result.activation_rms["mid#1"] == pytest.approx(float(second.pow(2).mean().sqrt()), rel=1e-5)
    assert result.scores[("mid#1", "fp32")] == 0.0 and result.scores[("mid", "w4a8")] > result.scores[("mid", "w8a8")]


# --- scores ----------------------------------------------------------------------------------------


def test_every_candidate_is_scored_and_four_bits_score_above_eight(mnist, limpq):
    result, _ = limpq
    assert set(result.scores) == {(layer, p) for layer, names in mnist.candidates.items() for p in names}
    for layer, names in mnist.candidates.items():
        assert result.scores[(layer, "fp32")] == 0.0
        assert all(math.isfinite(result.scores[(layer, p)]) and result.scores[(layer, p)] > 0 for p in names if p != "fp32")
        assert result.weight_steps[layer][4] > result.weight_steps[layer][8], layer
        assert result.scores[(layer, "w4a8")] > result.scores[(layer, "w8a8")], layer
    # Weight-only INT4 drops the activation part of w4a8's score and nothing else.
    assert result.scores[("fc", "w4a16")] == pytest.approx(result.scores[("fc", "w4a8")] - result.activation_steps["fc"][8])
    assert result.optimizer_steps == SAMPLES // mnist.batch_size and result.seconds > 0


def test_a_step_pushed_through_zero_is_projected_back_positive():
    quantizer = LsqQuantizer.for_weight(4)
    quantizer.initialize(0.2)
    with torch.no_grad():
        quantizer.step.fill_(-0.05)  # where an oversized learning-rate step could carry it
    quantizer.keep_positive(0.01)
    assert quantizer.step.item() == pytest.approx(0.01 * quantizer.initial_step)
    with torch.no_grad():
        quantizer.step.fill_(0.3)
    quantizer.keep_positive(0.01)
    assert quantizer.step.item() == pytest.approx(0.3)  # a positive step is left alone


def test_a_large_step_learning_rate_keeps_every_step_positive(mnist):
    result = train_indicators(dataclasses.replace(mnist, step_lr=1.0), regularize=False, gmpq=False)
    steps = [s for table in (result.weight_steps, result.activation_steps) for per_bits in table.values() for s in per_bits.values()]
    assert min(steps) > 0


def test_steps_moved_from_their_initial_values(mnist, limpq):
    result, _ = limpq
    quantized = QuantizedCopy.create(mnist)
    quantized.initialize_steps(measure_float_model(mnist, quantized, False, None).inputs)
    initial = {layer: q.steps()[0] for layer, q in quantized.quantizers.items()}
    assert all(result.weight_steps[layer][b] != initial[layer][b] for layer in initial for b in (4, 8))


def test_same_seed_gives_identical_scores_and_another_seed_close_ones(mnist, limpq):
    result, _ = limpq
    assert score_layers("limpq", mnist) == result.scores  # through the method registry, same seed
    other = train_indicators(dataclasses.replace(mnist, seed=1), regularize=False, gmpq=False).scores
    assert other != result.scores
    for key, score in result.scores.items():
        assert other[key] == pytest.approx(score, rel=0.2, abs=1e-12), key


def test_the_user_module_is_left_untouched(mnist, limpq):
    _, before = limpq
    after = mnist.module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    conv = mnist.module.get_submodule("stem.conv")
    assert type(conv) is nn.Conv2d and not conv._forward_pre_hooks and not mnist.module._forward_pre_hooks
    assert not mnist.module.training


def test_outlier_rule_makes_a_step_inverted_bit_width_prohibitive():
    assert unreliable_bits({2: 0.5, 4: 0.2, 8: 0.3}) == {4}
    assert unreliable_bits({4: 0.4, 8: 0.1}) == set()
    candidates = {"a": ["fp32", "w8a8", "w4a8", "w4a16"], "b": ["fp32", "w8a8", "w4a8"]}
    weight_steps = {"a": {4: 0.01, 8: 0.02}, "b": {4: 0.4, 8: 0.1}}  # a's 4-bit step is below its 8-bit one
    activation_steps = {"a": {8: 0.05}, "b": {8: 0.05}}
    scores = scores_from_steps(candidates, weight_steps, activation_steps)
    largest_reliable = max(scores[("a", "w8a8")], scores[("b", "w8a8")], scores[("b", "w4a8")])
    assert scores[("b", "w4a8")] == pytest.approx(0.05 + 2 * 0.4)
    assert scores[("a", "w4a8")] == scores[("a", "w4a16")] == pytest.approx(PROHIBITIVE * largest_reliable)
    assert scores[("a", "w8a8")] == pytest.approx(0.05 + 2 * 0.02) and scores[("a", "fp32")] == 0.0


# --- seam ------------------------------------------------------------------------------------------


def test_margin_cross_entropy_is_at_least_the_plain_one():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5) * 3, torch.randint(0, 5, (16,))
    plain = F.cross_entropy(logits, labels)
    assert float(margin_cross_entropy(logits, labels, margin=0.0)) == pytest.approx(float(plain))
    assert float(margin_cross_entropy(logits, labels, margin=0.5)) > float(plain)
    assert float(margin_cross_entropy(logits, labels, margin=2.0)) > float(margin_cross_entropy(logits, labels, margin=0.5))


def test_compactness_is_zero_at_the_class_means_and_scale_free():
    centres = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]])
    labels = torch.tensor([0, 1, 1, 0, 1])
    assert float(compactness_loss(centres[labels], labels)) == 0.0
    assert float(compactness_loss(centres[labels], labels, centres=centres, scale=2.0)) == 0.0
    spread = centres[labels] + torch.tensor([[0.1, 0.0, 0.0], [0.0, -0.2, 0.0], [0.0, 0.2, 0.0], [-0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = float(compactness_loss(spread, labels))
    assert loss > 0
    assert float(compactness_loss(10 * spread, labels)) == pytest.approx(loss)


def test_proxy_head_fits_its_labels():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, 120))
    features = torch.from_numpy(rng.standard_normal((120, 8)).astype(np.float32)) + 4 * F.one_hot(labels, 8).float() + 50
    head = train_proxy_head(features, labels, 3)
    assert float((head(features).argmax(dim=1) == labels).float().mean()) > 0.95
    assert not any(p.requires_grad for p in head.parameters())


def test_seam_with_labels_of_other_classes_trains_a_proxy_head(mnist):
    others = dataclasses.replace(mnist, labels=mnist.labels % 5, labels_match_model=False)
    result = train_indicators(others, regularize=True, gmpq=False)
    assert set(result.scores) == {(layer, p) for layer, names in mnist.candidates.items() for p in names}
    assert all(math.isfinite(s) and s >= 0 for s in result.scores.values())
    assert all(result.scores[(layer, "w4a8")] > result.scores[(layer, "w8a8")] for layer in mnist.candidates)


# --- gmpq ------------------------------------------------------------------------------------------


def test_grad_cam_maps_are_non_negative_at_the_last_spatial_conv(mnist):
    model = copy.deepcopy(mnist.module)
    inputs = (torch.from_numpy(mnist.feeds["image"][:4]),)
    module = last_spatial_conv(model, inputs)
    assert module is model.get_submodule("block3.conv2")
    kept = []
    handle = module.register_forward_hook(lambda _m, _a, out: kept.append(out))
    logits = model(*inputs)
    handle.remove()
    maps = grad_cam(logits, kept[0], logits.argmax(dim=1))
    assert maps.shape == (4, 7, 7) and bool((maps >= 0).all()) and maps.sum().item() > 0
    assert attribution_loss(maps, maps, power=1).item() == pytest.approx(0.0, abs=1e-6)
    assert attribution_loss(maps, maps.flip(0), power=1).item() > 0


def test_seam_with_the_gmpq_term_trains(mnist):
    result = train_indicators(dataclasses.replace(mnist, labels=None, gmpq=True), regularize=True, gmpq=True)
    assert set(result.scores) == {(layer, p) for layer, names in mnist.candidates.items() for p in names}
    assert all(math.isfinite(s) and s >= 0 for s in result.scores.values())
    assert all(result.weight_steps[layer][4] > result.weight_steps[layer][8] for layer in mnist.candidates)


def _float_argmax(context: SensitivityContext) -> np.ndarray:
    with torch.no_grad():
        return context.module(torch.from_numpy(context.feeds["image"])).argmax(dim=1).numpy()
