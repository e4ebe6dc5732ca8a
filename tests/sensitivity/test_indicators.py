"""limpq / seam indicator training on the bundled mnist-cnn: the LSQ quantizer's numbers, LIMPQ's
training recipe (SGD, clipping, cosine, weights and switchable BatchNorm trained), the iteration
budget and the convergence check, the recorded step statistics, the scores' shape and order,
determinism, the untouched user module, seam's margin terms, the proxy head, the GMPQ attribution
term, LIMPQ's outlier rule and its fixed first and last layers, and asga's training."""

import copy
import dataclasses
import json
import math
import textwrap

import numpy as np
import onnx_ir as ir
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from mpqc.data.mnist import mnist_split
from mpqc.errors import MpqcError
from mpqc.passes.analysis import analyze
from mpqc.sensitivity.batchnorm import SwitchableBatchNorm
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.gradcam import attribution_loss, grad_cam, last_spatial_conv
from mpqc.sensitivity.indicators import (
    LEARNING_RATE,
    MIN_LEARNING_RATE,
    PROHIBITIVE,
    WEIGHT_DECAY,
    ConvergenceMonitor,
    QuantizedCopy,
    _supervision,
    _Trainer,
    measure_float_model,
    scores_from_steps,
    train_indicators,
    unreliable_bits,
)
from mpqc.sensitivity.lsq import InputStatistics, LayerQuantizers, LsqQuantizer, lsq_fake_quantize
from mpqc.sensitivity.margin import MarginRegularizer, compactness_loss, margin_cross_entropy, train_proxy_head
from mpqc.sensitivity.methods import score_layers, scored_layers
from mpqc.targets import load_target

SAMPLES = 256
ITERATIONS = 8  # a pass over the 256 samples in batches of 32: enough to move every step, quick on two cores


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
        iterations=ITERATIONS,
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
        target=target, feeds={"input": x}, input_names=("input",), module=analysis.loaded.module, iterations=2,
        batch_size=16,
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
    assert result.optimizer_steps == ITERATIONS and result.seconds > 0


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


def test_steps_moved_from_their_initial_values(mnist, limpq):
    result, _ = limpq
    quantized = QuantizedCopy.create(mnist)
    quantized.initialize_steps(measure_float_model(mnist, quantized, False, None).inputs)
    initial = {layer: q.steps()[0] for layer, q in quantized.quantizers.items()}
    assert result.initial_weight_steps == initial  # the recorded starting point is the real one
    assert all(result.weight_steps[layer][b] != initial[layer][b] for layer in initial for b in (4, 8))
    steps = [s for table in (result.weight_steps, result.activation_steps) for per_bits in table.values() for s in per_bits.values()]
    assert min(steps) > 0


def test_the_result_records_how_far_the_steps_moved_and_their_order(limpq):
    result, _ = limpq
    record = json.loads(json.dumps(result.to_json()))  # what build.json would hold
    summary = record["step_summary"]
    layers = sorted(result.weight_steps)
    for bits in (4, 8):
        learned = [result.weight_steps[layer][bits] for layer in layers]
        initial = [result.initial_weight_steps[layer][bits] for layer in layers]
        ratios = np.array(learned) / np.array(initial)
        entry = summary["weight"][str(bits)]
        assert entry["layers"] == len(layers)
        assert entry["learned_over_initial"] == pytest.approx(
            {"min": ratios.min(), "median": np.median(ratios), "max": ratios.max()})
        assert entry["spearman_with_initial"] == pytest.approx(spearmanr(learned, initial).statistic)
    gap = spearmanr([result.weight_steps[la][4] - result.weight_steps[la][8] for la in layers],
                    [result.initial_weight_steps[la][4] - result.initial_weight_steps[la][8] for la in layers]).statistic
    assert summary["weight_gap_spearman_with_initial"]["4-8"] == pytest.approx(gap)
    assert set(summary["activation"]) == {"8"}
    convergence = record["convergence"]
    # 8 iterations: a window of 1 is too short to judge convergence, so the budget runs out.
    assert convergence == {"budget": ITERATIONS, "window": 1, "tolerance": 0.01, "converged": False, "iteration": None,
                           "movement": convergence["movement"]}
    assert [i for i, _ in convergence["movement"]] == list(range(1, ITERATIONS + 1))
    assert record["initial_weight_steps"]["fc"]["4"] == result.initial_weight_steps["fc"][4]


def test_weight_steps_start_from_the_weight_spread():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3) * 0.05 + 0.01
    quantizers = LayerQuantizers("conv", [4, 8], [8])
    statistics = InputStatistics()
    statistics.add(torch.rand(2, 8, 5, 5))
    quantizers.initialize(weight, statistics)
    mean, std = float(weight.double().mean()), float(weight.double().std())
    spread = max(abs(mean - 3 * std), abs(mean + 3 * std))
    assert quantizers.weight["4"].step.item() == pytest.approx(spread / 8)  # LIMPQ: 3 std over 2^(b-1)
    assert quantizers.weight["8"].step.item() == pytest.approx(spread / 128)
    assert quantizers.activation["8"].step.item() == pytest.approx(2 * statistics.first_mean_abs / math.sqrt(255))


def test_one_iteration_follows_limpq_recipe(mnist):
    quantized = QuantizedCopy.create(mnist)
    reference = measure_float_model(mnist, quantized, False, None)
    quantized.initialize_steps(reference.inputs)
    labels, regularizer = _supervision(mnist, reference, False)
    trainer = _Trainer(mnist, quantized, labels, regularizer, reference, None, 1, 2)
    groups = trainer.optimizer.param_groups
    assert type(trainer.optimizer) is torch.optim.SGD and all(g["momentum"] == 0.9 for g in groups)
    assert [g["weight_decay"] for g in groups] == [WEIGHT_DECAY, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    model = quantized.model
    before = copy.deepcopy(model.state_dict())
    bns = {name: m for name, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)}
    assert set(bns) == {"stem.bn", "block1.bn1", "block1.bn2", "block1.shortcut.bn", "block2.bn1", "block2.bn2",
                        "block2.shortcut.bn", "block3.bn1", "block3.bn2"}
    model.train()
    trainer.step(np.arange(32), [*quantized.uniform_settings(), quantized.random_setting(0, 0)])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The weights train with the steps, and every BatchNorm copy a pass reached trains (train mode:
    # its running statistics move too); the float and shared copies no layer ran at stay as they were.
    assert "stem.conv.parametrizations.weight.original" in changed and "fc.bias" in changed
    for name in bns:
        for key in ("w8", "w4"):
            assert {f"{name}.copies.{key}.weight", f"{name}.copies.{key}.running_mean"} <= changed, (name, key)
        for key in ("fp32", "shared"):
            assert not any(k.startswith(f"{name}.copies.{key}.") for k in changed), (name, key)
            assert bns[name].copies[key].weight.grad is None  # an all-zero gradient sits the step out
    assert not torch.equal(after["stem.bn.copies.w8.weight"], after["stem.bn.copies.w4.weight"])
    gradients = [p.grad for p in trainer.parameters if p.grad is not None]
    assert max(float(g.abs().max()) for g in gradients) <= 1.0  # clipped per element
    assert trainer.schedule.get_last_lr()[0] == pytest.approx(MIN_LEARNING_RATE + (LEARNING_RATE - MIN_LEARNING_RATE) / 2)
    trainer.step(np.arange(32, 64), [*quantized.uniform_settings()])
    assert trainer.schedule.get_last_lr()[0] == pytest.approx(MIN_LEARNING_RATE)  # the cosine's end at the budget


def test_each_batch_norm_uses_the_copy_of_the_bit_width_its_conv_ran_at(mnist):
    quantized = QuantizedCopy.create(mnist)
    quantized.initialize_steps(measure_float_model(mnist, quantized, False, None).inputs)
    model = quantized.model.train()
    bns = {name: m for name, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)}
    producer = {name: name.replace("bn", "conv") for name in bns}  # stem.bn <- stem.conv, block1.bn1 <- block1.conv1
    # A mixed policy that runs some of these convs at 4 bits and others at 8.
    setting = next(s for s in (quantized.random_setting(0, k) for k in range(100))
                   if {s[c][0] for c in producer.values()} == {4, 8})
    before = {name: {key: bn.running_mean.clone() for key, bn in m.copies.items()} for name, m in bns.items()}
    quantized.apply(setting)
    with torch.no_grad():
        model(torch.from_numpy(mnist.feeds["image"][:16]).contiguous(memory_format=torch.channels_last))
    for name, m in bns.items():
        moved = {key for key, bn in m.copies.items() if not torch.equal(bn.running_mean, before[name][key])}
        assert moved == {f"w{setting[producer[name]][0]}"}, name


def test_the_budget_counts_iterations_on_any_proxy_size(mnist):
    small = dataclasses.replace(mnist, feeds={"image": mnist.feeds["image"][:10]}, labels=mnist.labels[:10], iterations=12)
    assert small.indicator_iterations() == 12 == dataclasses.replace(mnist, iterations=12).indicator_iterations()
    result = train_indicators(small, regularize=False, gmpq=False)
    assert result.optimizer_steps == 12  # 12 batches of all 10 samples, not one pass
    # Where a caller asks for epochs, the budget is that many passes over the proxy.
    assert dataclasses.replace(mnist, epochs=2).indicator_iterations() == 2 * SAMPLES // mnist.batch_size
    assert dataclasses.replace(small, epochs=3).indicator_iterations() == 3


def test_convergence_is_no_step_moving_over_a_tenth_of_the_budget():
    start = torch.tensor([1.0, 2.0])
    monitor = ConvergenceMonitor(100, start)  # a window of 10 iterations
    steps = start.clone()
    stopped = None
    for iteration in range(1, 101):
        if iteration <= 30:
            steps = steps * torch.tensor([1.05, 1.0])  # the first step moves 5% an iteration, then settles
        if monitor.update(iteration, steps):
            stopped = iteration
            break
    # Iteration 40 is the first whose last 10 iterations moved no step: 31..40 all equal iteration 30.
    assert stopped == 40 and monitor.record.converged and monitor.record.iteration == 40
    assert [i for i, _ in monitor.record.movement] == [10, 20, 30, 40]
    assert monitor.record.movement[0][1] == pytest.approx(1.05**10 - 1, rel=1e-5)  # float32 steps
    assert monitor.record.movement[-1][1] == 0.0
    # Almost settled is not settled: 1.5% over the window keeps training going.
    drifting = ConvergenceMonitor(100, start)
    assert not any(drifting.update(i, start * (1 + 0.0015 * i)) for i in range(1, 101))
    # A budget under 100 iterations gives a window under 10: too short to judge, the budget runs out.
    short = ConvergenceMonitor(50, start)
    assert not any(short.update(i, start) for i in range(1, 51)) and not short.record.converged


def test_fixed_ends_hold_the_first_and_last_layer_at_eight_bits(mnist):
    context = dataclasses.replace(mnist, fixed_ends=True, iterations=4)
    quantized = QuantizedCopy.create(context)
    assert quantized.held == {"stem.conv": (8, 8), "fc": (8, 8)}
    assert all(s["stem.conv"] == s["fc"] == (8, 8) for s in [*quantized.uniform_settings(), quantized.random_setting(0, 1)])
    quantized.initialize_steps(measure_float_model(context, quantized, False, None).inputs)
    model = quantized.model.train()
    quantized.apply(quantized.uniform_settings()[-1])  # 4 bits everywhere else
    stem_bn = model.get_submodule("stem.bn")
    before = {key: bn.running_mean.clone() for key, bn in stem_bn.copies.items()}
    with torch.no_grad():
        model(torch.from_numpy(context.feeds["image"][:16]).contiguous(memory_format=torch.channels_last))
    # One BatchNorm behind the held stem, whatever the others run at (LIMPQ's non-switchable bn1).
    assert {k for k, bn in stem_bn.copies.items() if not torch.equal(bn.running_mean, before[k])} == {"shared"}
    result = train_indicators(context, regularize=False, gmpq=False)
    for layer in ("stem.conv", "fc"):
        assert result.weight_steps[layer][4] == result.initial_weight_steps[layer][4]  # never trained
        assert result.weight_steps[layer][8] != result.initial_weight_steps[layer][8]
        reliable = [s for (la, p), s in result.scores.items() if la not in quantized.held or p == "w8a8"]
        assert result.scores[(layer, "w4a8")] == pytest.approx(PROHIBITIVE * max(reliable))
        assert result.scores[(layer, "fp32")] == result.scores[(layer, "w4a8")]  # held at 8 bits, not float either
        assert 0 < result.scores[(layer, "w8a8")] < max(reliable) * 10
    assert result.scores[("fc", "w4a16")] == result.scores[("fc", "w4a8")]
    assert result.weight_steps["block1.conv1"][4] != result.initial_weight_steps["block1.conv1"][4]
    # The ILP does not choose for held layers, so their steps are no indicators to summarise.
    assert result.held_layers == ("stem.conv", "fc")
    assert result.step_summary()["weight"]["4"]["layers"] == len(result.weight_steps) - 2


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


def test_seam_terms_are_weighted_as_set_and_off_without_weights():
    torch.manual_seed(0)
    features, logits, labels = torch.randn(16, 6), torch.randn(16, 3) * 2, torch.randint(0, 3, (16,))
    regularizer = MarginRegularizer.fit(features.numpy(), labels.numpy(), 3, proxy_head=False)
    compact = compactness_loss(features, labels, regularizer.centres, regularizer.feature_scale)
    assert float(regularizer(features, logits, labels)) == pytest.approx(float(compact + margin_cross_entropy(logits, labels, 1.0)))
    weighted = dataclasses.replace(regularizer, terms=(2.0, 0.5, 3.0))
    assert float(weighted(features, logits, labels)) == pytest.approx(
        float(0.5 * compact + 3.0 * margin_cross_entropy(logits, labels, 2.0)))
    assert float(dataclasses.replace(regularizer, terms=(1.0, 0.0, 0.0))(features, logits, labels)) == 0.0


def test_seam_without_its_terms_is_limpq(mnist, limpq):
    ablated = score_layers("seam", dataclasses.replace(mnist, seam_terms=(1.0, 0.0, 0.0)))
    assert ablated == limpq[0].scores  # same seed, same batches, same loss
    assert scored_layers("seam", mnist).details["seam_terms"] == {"margin": 1.0, "compactness_weight": 1.0, "margin_weight": 1.0}


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


# --- asga -----------------------------------------------------------------------------------------


def test_asga_trains_records_its_sharpness_and_is_deterministic(mnist):
    asga = scored_layers("asga", mnist)
    assert set(asga.scores) == {(layer, p) for layer, names in mnist.candidates.items() for p in names}
    sharpness = asga.details["sharpness"]
    assert sharpness["iterations"] == asga.details["iterations"] > 0
    assert sharpness["surrogate_gap"]["first"] > 0 and -1 <= sharpness["gradient_cosine"]["last"] <= 1
    assert sharpness["radius"]["first"] > sharpness["radius"]["last"]  # the radius narrows with the learning rate
    assert scored_layers("asga", mnist).scores == asga.scores  # same seed, same scores
    limpq = train_indicators(mnist, regularize=False, gmpq=False)
    assert limpq.sharpness is None and "sharpness" not in limpq.details()
    assert limpq.scores != asga.scores  # the aligned update trains other steps than plain SGD


def test_asga_refuses_an_onnx_file_with_its_own_name(mnist):
    with pytest.raises(MpqcError, match="--method asga trains on the torch model"):
        scored_layers("asga", dataclasses.replace(mnist, module=None))


@pytest.mark.parametrize("method", ["limpq", "seam", "asga"])
def test_a_model_whose_output_is_not_class_scores_is_refused_before_training(mnist, method):
    """MiniLM's (N, 384) embeddings pass the 2-D shape check: the model's own word must stop them."""
    from mpqc.sensitivity.methods import scored_layers

    with pytest.raises(MpqcError, match=f"--method {method} trains on the model's classes.*use --method output"):
        scored_layers(method, dataclasses.replace(mnist, classifier=False))
