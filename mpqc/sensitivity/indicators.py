"""Learned importance indicators: `limpq` (Tang et al., ECCV 2022), `seam` (SEAM, ACM MM 2023) and
`asga` (ASGA, ICML 2025: limpq's training with a sharpness-aware, gradient-aligned update,
mpqc.sensitivity.sharpness).

A copy of the torch module gets LSQ quantizers on every layer (mpqc.sensitivity.lsq): one learnable
step per layer per candidate weight bit-width and per candidate activation bit-width. Training
follows the recipe of LIMPQ's reference code (1hunters/LIMPQ, indicators_pretraining): every
iteration trains all of them jointly on one batch of the proxy data, sharing the weights:

* one pass per candidate weight bit-width b at the uniform policy "b everywhere" (each layer that
  offers b takes its candidate with b weight bits, its activations at that candidate's bit-width;
  layers without b stay float),
* one pass at a random mixed policy (each layer one of its quantized candidates, uniformly), seeded
  from (seed, iteration),

each backpropagated on its own, then one SGD step (learning rate 0.01, momentum 0.9, weight decay
2.5e-5 on weight tensors only, as timm's optimizer factory leaves biases, BatchNorm and the steps
undecayed), every gradient element clipped to [-1, 1] and a parameter whose gradient is all zero
left out of the step; the learning rate follows a cosine from 0.01 to 1e-5 over the iteration
budget. Everything trains: the steps, the weights and biases of every layer, and BatchNorm in
train mode, one copy per bit-width (mpqc.sensitivity.batchnorm). The loss is cross entropy with
label smoothing 0.1 on the training labels; seam adds its compactness and margin terms
(mpqc.sensitivity.margin) and `context.gmpq` adds GMPQ's attribution term
(mpqc.sensitivity.gradcam). The user's module is not touched.

The run is an iteration budget, not a number of epochs: a 4% proxy trains as many iterations as the
full one, cycling through its samples. It stops early once the steps have converged: when no step
moved by more than 1% of its value over the last 10% of the budget (checked after every iteration
once that window, at least 10 iterations, has passed). The result records whether and when that
happened, how far each step moved from its initial value and whether the steps' order across
layers still is the initial one (Spearman's rho): an indicator that only repeats its initial
value, which depends on the weights alone, measures nothing the weights did not already say.

Initial steps: a weight's from its spread (LIMPQ's 3 std / 2^(b-1), see mpqc.sensitivity.lsq), an
activation's LSQ value from the float model's first batch. LIMPQ's reference takes the latter from
the first training batch at that bit-width; the float batch is the same on every rank without
communication and defined before any training.

The learned steps are the indicators, scored as LIMPQ's ILP objective: score(layer, p) =
s_a + alpha * s_w with alpha = 2, s_w and s_a the raw steps at p's weight and activation bit-widths,
no activation part for weight-only precisions and 0 for fp32. An earlier mpqc version divided each
step by the RMS of what it quantizes; that leaves little more than the LSQ initial step relative to
the tensor, the same for every layer, and its EfficientNet-Lite0 policies fell to random ones in the
transfer benchmark, where the raw steps beat them. LIMPQ's outlier rule: a lower bit-width whose step
came out smaller than a higher bit-width's of the same layer did not learn a meaningful step, so its
precisions get a prohibitive score for that layer. The RMS of each weight and of each layer's input
stay in the result, to read the steps against.

LIMPQ does not search the first and the last layer (fixed at 8 bits). mpqc searches every layer the
target can quantize, so by default those two train like the others; `fixed_ends` holds them at
their 8-bit candidate in every pass, with one BatchNorm behind them, and scores their other
candidates prohibitively (fp32 too), as LIMPQ's search never picks them (`--fixed-ends`).

Labels: the proxy's labels when they are the model's classes, otherwise the float model's argmax.
Labels of other classes (`labels_match_model=False`) cannot supervise the model's own logits:
its cross entropy then fits the float model's argmax, and seam's terms use the labels through a
proxy head trained on the float features.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from mpqc import progress
from mpqc.errors import MpqcError
from mpqc.precision import precision
from mpqc.sensitivity import distributed
from mpqc.sensitivity.batchnorm import make_switchable
from mpqc.sensitivity.context import SensitivityContext
from mpqc.sensitivity.gradcam import OutputCapture, attribution_loss, grad_cam, last_spatial_conv
from mpqc.sensitivity.lsq import InputStatistics, LayerQuantizers, attach_quantizers, quantized_weight_parameter
from mpqc.sensitivity.margin import MarginRegularizer
from mpqc.sensitivity.methods import Scored
from mpqc.sensitivity.sharpness import SharpnessSettings, SharpnessStep, align_gradients, summarize

ALPHA = 2.0  # LIMPQ: minimise sum(s_a + alpha * s_w)
# LIMPQ's indicator-training configuration (indicators_pretraining/config_resnet*.yaml).
LABEL_SMOOTHING = 0.1
LEARNING_RATE = 0.01
MIN_LEARNING_RATE = 1e-5  # the cosine's floor
MOMENTUM = 0.9
WEIGHT_DECAY = 2.5e-5
GRAD_CLIP_VALUE = 1.0  # every gradient element is clipped to [-1, 1] (clip_grad_value_)
FIXED_END_BITS = 8
# Convergence: no step moved by more than CONVERGENCE_TOLERANCE of its value over the last
# CONVERGENCE_WINDOW of the budget (at least MIN_CONVERGENCE_WINDOW iterations).
CONVERGENCE_TOLERANCE = 0.01
CONVERGENCE_WINDOW = 0.1
MIN_CONVERGENCE_WINDOW = 10
MIN_STEP_FRACTION = 0.01  # a learned step never falls below this fraction of its initial value
PROHIBITIVE = 1e6  # times the largest reliable score

Setting = dict[str, tuple[int | None, int | None]]  # layer -> (weight bits, activation bits); None: float


@dataclasses.dataclass
class Convergence:
    """Whether the steps settled within the iteration budget, and how much they still moved."""

    budget: int  # iterations asked for
    window: int  # iterations the movement is measured over
    tolerance: float
    converged: bool = False
    iteration: int | None = None  # the iteration training stopped at because the steps had converged
    # (iteration, the largest relative change of any step over the window before it), every window
    movement: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {"budget": self.budget, "window": self.window, "tolerance": self.tolerance, "converged": self.converged,
                "iteration": self.iteration, "movement": [[i, m] for i, m in self.movement]}


class ConvergenceMonitor:
    """Keeps the steps of the last `window` iterations and says when none moved more than the tolerance."""

    def __init__(self, budget: int, initial: torch.Tensor, tolerance: float = CONVERGENCE_TOLERANCE,
                 fraction: float = CONVERGENCE_WINDOW, minimum: int = MIN_CONVERGENCE_WINDOW):
        window = max(1, math.ceil(fraction * budget))
        self.record = Convergence(budget, window, tolerance)
        # A window shorter than `minimum` iterations says more about one batch than about convergence.
        self.checking = window >= minimum
        self.history: list[torch.Tensor] = [initial.detach().double().clone()]

    def update(self, iteration: int, steps: torch.Tensor) -> bool:
        """Steps after `iteration` iterations; True once they have converged."""
        self.history.append(steps.detach().double().clone())
        window = self.record.window
        if len(self.history) <= window:
            return False
        earlier = self.history.pop(0)
        change = float(((steps.detach().double() - earlier).abs() / earlier.abs().clamp(min=1e-30)).max()) \
            if steps.numel() else 0.0
        if iteration % window == 0:
            self.record.movement.append((iteration, change))
        if self.checking and change <= self.record.tolerance:
            if iteration % window != 0:
                self.record.movement.append((iteration, change))
            self.record.converged, self.record.iteration = True, iteration
            return True
        return False


@dataclasses.dataclass
class IndicatorResult:
    scores: dict[tuple[str, str], float]
    weight_steps: dict[str, dict[int, float]]  # layer -> weight bits -> learned step (raw)
    activation_steps: dict[str, dict[int, float]]  # layer -> activation bits -> learned step (raw)
    weight_rms: dict[str, float]
    activation_rms: dict[str, float]
    seconds: float  # wall time of the whole training, float pass included
    optimizer_steps: int  # iterations trained
    rank_divergence: float = 0.0  # under DDP: this rank's largest relative step difference from rank 0's
    initial_weight_steps: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    initial_activation_steps: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    convergence: Convergence | None = None
    held_layers: tuple[str, ...] = ()  # layers trained at one fixed setting (fixed_ends): no indicators
    sharpness: dict | None = None  # asga: its settings, surrogate gap and gradient cosine (sharpness.summarize)

    def details(self) -> dict:
        """What a build records of the training: iterations against the budget, the convergence
        check, and how far the steps moved from their initial values (step_summary)."""
        details = {"iterations": self.optimizer_steps, "training_s": self.seconds,
                   "convergence": None if self.convergence is None else self.convergence.to_json(),
                   "held_layers": list(self.held_layers), "steps": self.step_summary()}
        return details | ({"sharpness": self.sharpness} if self.sharpness is not None else {})

    def step_summary(self) -> dict:
        """Per kind and bit-width: learned / initial over layers (min, median, max) and Spearman's rho
        between the learned and the initial steps' order over layers; and the same rho for the gap
        between each pair of adjacent weight bit-widths, s_w(lower) - s_w(higher), which is what
        decides between them in the ILP. Held layers are left out: the ILP does not choose for them."""
        summary: dict = {}
        held = set(self.held_layers)
        for kind, learned, initial in (("weight", self.weight_steps, self.initial_weight_steps),
                                       ("activation", self.activation_steps, self.initial_activation_steps)):
            learned = {layer: steps for layer, steps in learned.items() if layer not in held}
            per_bits = {}
            for bits in sorted({b for steps in learned.values() for b in steps}):
                layers = [layer for layer in learned if bits in learned[layer] and bits in initial.get(layer, {})]
                if not layers:
                    continue
                ratios = np.array([learned[layer][bits] / initial[layer][bits] for layer in layers])
                per_bits[str(bits)] = {
                    "layers": len(layers),
                    "learned_over_initial": {"min": float(ratios.min()), "median": float(np.median(ratios)),
                                             "max": float(ratios.max())},
                    "spearman_with_initial": rank_correlation([learned[layer][bits] for layer in layers],
                                                              [initial[layer][bits] for layer in layers]),
                }
            summary[kind] = per_bits
        widths = sorted({b for steps in self.weight_steps.values() for b in steps})
        gaps = {}
        for low, high in zip(widths, widths[1:]):
            layers = [layer for layer, steps in self.weight_steps.items() if low in steps and high in steps
                      and low in self.initial_weight_steps.get(layer, {}) and layer not in held]
            gaps[f"{low}-{high}"] = rank_correlation(
                [self.weight_steps[layer][low] - self.weight_steps[layer][high] for layer in layers],
                [self.initial_weight_steps[layer][low] - self.initial_weight_steps[layer][high] for layer in layers])
        summary["weight_gap_spearman_with_initial"] = gaps
        return summary

    def to_json(self) -> dict:
        return {
            "scores": [{"layer": layer, "precision": p, "score": s} for (layer, p), s in self.scores.items()],
            "weight_steps": _bits_as_text(self.weight_steps),
            "activation_steps": _bits_as_text(self.activation_steps),
            "initial_weight_steps": _bits_as_text(self.initial_weight_steps),
            "initial_activation_steps": _bits_as_text(self.initial_activation_steps),
            "weight_rms": self.weight_rms,
            "activation_rms": self.activation_rms,
            "step_summary": self.step_summary(),
            "convergence": None if self.convergence is None else self.convergence.to_json(),
            "held_layers": list(self.held_layers),
            "seconds": self.seconds,
            "optimizer_steps": self.optimizer_steps,
            "rank_divergence": self.rank_divergence,
            "sharpness": self.sharpness,
        }


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho, or None where it is undefined (fewer than 3 values, or a constant side)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def limpq_scores(context: SensitivityContext) -> Scored:
    result = train_indicators(context, regularize=False, gmpq=context.gmpq)
    return Scored(result.scores, result.details())


def seam_scores(context: SensitivityContext) -> Scored:
    result = train_indicators(context, regularize=True, gmpq=context.gmpq)
    margin, compactness, margin_weight = context.seam_terms
    terms = {"margin": margin, "compactness_weight": compactness, "margin_weight": margin_weight}
    return Scored(result.scores, result.details() | {"seam_terms": terms})


def asga_scores(context: SensitivityContext) -> Scored:
    result = train_indicators(context, regularize=False, gmpq=context.gmpq, sharpness=SharpnessSettings())
    return Scored(result.scores, result.details())


def train_indicators(context: SensitivityContext, regularize: bool, gmpq: bool,
                     sharpness: SharpnessSettings | None = None) -> IndicatorResult:
    """Trains the steps jointly (see the module docstring) and turns them into scores; with
    `sharpness`, every update is ASGA's (mpqc.sensitivity.sharpness)."""
    clock = time.perf_counter()
    method = "asga" if sharpness is not None else "seam" if regularize else "limpq"
    context.require_module(method)
    if not context.classifier:  # a 2-D output of another kind (embeddings) would pass the shape check and train nonsense
        raise MpqcError(f"--method {method} trains on the model's classes, and this model's output is not class scores "
                        "(the model says so, e.g. sentence embeddings): use --method output (the default), qerror or hawq")
    rank, world_size = distributed.process_group()
    quantized = QuantizedCopy.create(context, world_size)
    attribution_module = None
    if gmpq:
        first = _inputs(context, np.arange(min(context.batch_size, context.sample_count)), quantized.channels_last)
        attribution_module = last_spatial_conv(quantized.model, first)
        if attribution_module is None:
            raise MpqcError("--gmpq needs a convolution with a 4-D output for Grad-CAM; this model has none")
    reference = measure_float_model(context, quantized, with_features=regularize, attribution_module=attribution_module)
    quantized.initialize_steps(reference.inputs)
    initial_weight, initial_activation = quantized.current_steps()

    labels, regularizer = _supervision(context, reference, regularize)
    budget = context.indicator_iterations()
    batches = distributed.iteration_batches(context.sample_count, context.batch_size, context.seed, budget, rank,
                                            world_size)
    trainer = _Trainer(context, quantized, labels, regularizer, reference, attribution_module, world_size, budget,
                       sharpness)
    monitor = ConvergenceMonitor(budget, quantized.step_vector())
    iterations = 0
    # Train-mode randomness (dropout, if the model has any) is seeded and kept off the caller's generator.
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        quantized.model.train()
        for indices in progress.bar(batches, f"training {method} indicators",
                                    total=budget, unit="step"):
            trainer.step(indices, [*quantized.uniform_settings(), quantized.random_setting(context.seed, iterations)])
            iterations += 1
            if distributed.any_rank(monitor.update(iterations, quantized.step_vector()), world_size):
                break
        quantized.model.eval()
    trainer.close()

    weight_steps, activation_steps, divergence = quantized.learned_steps(world_size)
    weight_rms = quantized.weight_rms()
    activation_rms = {layer: stats.rms for layer, stats in reference.inputs.items()}
    scores = scores_from_steps(context.candidates, weight_steps, activation_steps, held=quantized.held)
    return IndicatorResult(scores, weight_steps, activation_steps, weight_rms, activation_rms,
                           time.perf_counter() - clock, iterations, divergence, initial_weight, initial_activation,
                           monitor.record, tuple(quantized.held),
                           None if sharpness is None else summarize(trainer.sharpness_steps, sharpness))


def scores_from_steps(
    candidates: Mapping[str, Sequence[str]],
    weight_steps: Mapping[str, Mapping[int, float]],
    activation_steps: Mapping[str, Mapping[int, float]],
    alpha: float = ALPHA,
    held: Mapping[str, tuple[int | None, int | None]] | None = None,
) -> dict[tuple[str, str], float]:
    """(layer, precision) -> s_a + alpha * s_w; fp32 0; unreliable bit-widths prohibitive, and so is
    every candidate of a layer held at one setting (`held`: layer -> (w_bits, a_bits)) but that one,
    fp32 included."""
    held = held or {}
    scores: dict[tuple[str, str], float] = {}
    unreliable: list[tuple[str, str]] = []
    for layer, names in candidates.items():
        bad_weight = unreliable_bits(weight_steps.get(layer, {}))
        bad_activation = unreliable_bits(activation_steps.get(layer, {}))
        for name in names:
            p = precision(name)
            if layer in held and (p.is_float or (p.weight_bits, p.activation_bits) != held[layer]):
                unreliable.append((layer, name))  # held at one setting, as LIMPQ's search holds it (float too)
                continue
            if p.is_float:
                scores[(layer, name)] = 0.0
                continue
            score = alpha * weight_steps[layer][p.weight_bits]
            if p.activation_bits is not None:
                score += activation_steps[layer][p.activation_bits]
            scores[(layer, name)] = score
            if p.weight_bits in bad_weight or p.activation_bits in bad_activation:
                unreliable.append((layer, name))
    top = max((s for key, s in scores.items() if key not in set(unreliable)), default=0.0)
    for key in unreliable:
        scores[key] = PROHIBITIVE * (top if top > 0 else 1.0)
    return scores


def unreliable_bits(steps: Mapping[int, float]) -> set[int]:
    """LIMPQ's outlier rule: bit-widths whose step is smaller than some higher bit-width's step."""
    return {b for b, s in steps.items() if any(s < other for higher, other in steps.items() if higher > b)}


class QuantizedCopy:
    """A deep copy of the user's module with LSQ quantizers on its layers, switchable BatchNorm, and
    the policies to train."""

    def __init__(self, model: nn.Module, quantizers: dict[str, LayerQuantizers], owners: dict[str, str],
                 choices: dict[str, list[tuple[int | None, int | None]]],
                 held: dict[str, tuple[int | None, int | None]] | None = None, channels_last: bool = False):
        self.model = model
        self.channels_last = channels_last  # inputs go in in channels-last layout
        self.quantizers = quantizers
        self.owners = owners  # layer -> module name
        self.choices = choices  # layer -> its quantized candidates as (w_bits, a_bits), candidate order
        self.held = held or {}  # layer -> the one setting it trains at (fixed_ends)
        self.float_weight_rms = {owner: _rms(quantized_weight_parameter(model, owner)) for owner in set(owners.values())}

    @classmethod
    def create(cls, context: SensitivityContext, world_size: int = 1) -> "QuantizedCopy":
        modules = context.layer_modules()  # checks every layer has a module
        owners = {layer.name: layer.name.split("#", 1)[0] for layer in context.layers}
        choices = {layer.name: _quantized_choices(context.candidates.get(layer.name, ())) for layer in context.layers}
        # Every call of a module gets quantizers once any of its calls is quantized: calls are matched
        # to layers by their order, so none may be skipped.
        quantized_owners = {owners[layer] for layer, options in choices.items() if options}
        owners = {layer: owner for layer, owner in owners.items() if owner in quantized_owners}
        choices = {layer: choices[layer] for layer in owners}
        for layer in owners:
            if not isinstance(getattr(modules[layer], "weight", None), nn.Parameter):
                raise MpqcError(f"layer '{layer}' comes from a torch module without a weight parameter "
                                f"({type(modules[layer]).__name__}): trained methods quantize module weights")
        held = _held_ends(context, choices) if context.fixed_ends else {}
        model = copy.deepcopy(context.require_module("this")).eval()
        model.requires_grad_(True)  # LIMPQ trains the weights (and BatchNorm) together with the steps
        quantizers = attach_quantizers(
            model, owners,
            {layer: sorted({w for w, _ in options}) for layer, options in choices.items()},
            {layer: sorted({a for _, a in options if a is not None}) for layer, options in choices.items()},
        )
        make_switchable(model, [w for options in choices.values() for w, _ in options if w is not None], held,
                        world_size)
        channels_last = _prefer_channels_last(model, context)
        return cls(model, quantizers, owners, choices, held, channels_last)

    def apply(self, setting: Setting) -> None:
        for layer, quantizers in self.quantizers.items():
            quantizers.setting = setting.get(layer, (None, None))

    def uniform_settings(self) -> list[Setting]:
        """One setting per candidate weight bit-width, widest first (held layers at their setting)."""
        widths = sorted({w for layer, options in self.choices.items() if layer not in self.held for w, _ in options},
                        reverse=True)
        settings = []
        for bits in widths:
            setting = dict(self.held)
            for layer, options in self.choices.items():
                offered = [a for w, a in options if w == bits]
                if offered and layer not in self.held:
                    setting[layer] = (bits, _uniform_activation_bits(bits, offered))
            settings.append(setting)
        return settings or [dict(self.held)]

    def random_setting(self, seed: int, step: int) -> Setting:
        """Each layer one of its quantized candidates, uniformly; the same on every rank for (seed, step)."""
        rng = np.random.default_rng([seed, step])
        setting = {layer: options[int(rng.integers(len(options)))] for layer, options in self.choices.items() if options}
        return {**setting, **self.held}

    def initialize_steps(self, inputs: Mapping[str, InputStatistics]) -> None:
        for layer, quantizers in self.quantizers.items():
            quantizers.initialize(quantized_weight_parameter(self.model, self.owners[layer]), inputs[layer])

    def every_quantizer(self):
        return [q for quantizers in self.quantizers.values() for q in quantizers.every_quantizer()]

    def step_vector(self) -> torch.Tensor:
        """Every step, in a fixed order (what the convergence check follows)."""
        return torch.stack([q.step.detach().reshape(()) for q in self.every_quantizer()]) \
            if self.quantizers else torch.zeros(0)

    def parameter_groups(self) -> list[dict]:
        """SGD groups: weight decay on weight tensors (2-D and up) only, as timm's optimizer factory
        does for LIMPQ (biases, BatchNorm and the steps are not decayed)."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]

    def keep_steps_positive(self) -> None:
        for quantizer in self.every_quantizer():
            quantizer.keep_positive(MIN_STEP_FRACTION)

    def weight_rms(self) -> dict[str, float]:
        return {layer: self.float_weight_rms[self.owners[layer]] for layer in self.quantizers}

    def current_steps(self) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
        """(weight steps, activation steps) per layer as they are now, on this rank."""
        weight, activation = {}, {}
        for layer, quantizers in self.quantizers.items():
            weight[layer], activation[layer] = quantizers.steps()
        return weight, activation

    def learned_steps(self, world_size: int) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]], float]:
        """(weight steps, activation steps) per layer, rank 0's under DDP, and this rank's drift from them."""
        keys, values = [], []
        for layer, quantizers in self.quantizers.items():
            for kind, table in zip(("weight", "activation"), quantizers.steps()):
                for bits, step in table.items():
                    keys.append((kind, layer, bits))
                    values.append(step)
        agreed, divergence = distributed.adopt_rank_zero(torch.tensor(values, dtype=torch.float64), world_size)
        steps: dict[str, dict[str, dict[int, float]]] = {kind: {layer: {} for layer in self.quantizers}
                                                         for kind in ("weight", "activation")}
        for (kind, layer, bits), value in zip(keys, agreed.tolist()):
            steps[kind][layer][bits] = value
        return steps["weight"], steps["activation"], divergence


@dataclasses.dataclass
class FloatReference:
    """What the float model does on the proxy: per-layer input statistics, predictions, features, maps."""

    inputs: dict[str, InputStatistics]
    predictions: np.ndarray  # (N,) argmax of the float logits
    classes: int  # number of logits
    features: np.ndarray | None  # (N, D) penultimate features (the classifier's input), when asked for
    maps: torch.Tensor | None  # (N, H, W) float Grad-CAM maps of the predicted class, when asked for


def measure_float_model(context: SensitivityContext, quantized: QuantizedCopy, with_features: bool,
                        attribution_module: nn.Module | None) -> FloatReference:
    """One float pass over the whole proxy, in order (the same on every rank, no communication)."""
    model = quantized.model
    quantized.apply({})
    statistics = {layer: InputStatistics() for layer in quantized.quantizers}
    for layer, quantizers in quantized.quantizers.items():
        quantizers.statistics = statistics[layer]
    classifier = _classifier(context, model) if with_features else None
    capture = _InputCapture(classifier) if classifier is not None else None
    predictions, features, maps = [], [], []
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        model.requires_grad_(False)  # Grad-CAM needs gradients to the feature map only
        for start in range(0, context.sample_count, context.batch_size):
            inputs = _inputs(context, np.arange(start, min(start + context.batch_size, context.sample_count)),
                             quantized.channels_last)
            if attribution_module is not None:
                logits, batch_maps = _float_attribution(model, attribution_module, inputs)
                maps.append(batch_maps)
            else:
                with torch.no_grad():
                    logits = model(*inputs)
            _check_classifier_output(logits)
            predictions.append(logits.argmax(dim=1).numpy())
            if capture is not None:
                if capture.output is None or not torch.equal(capture.output.detach(), logits.detach()):
                    raise MpqcError("seam needs the model's last layer to compute its logits (the classifier on "
                                    "the penultimate features); this model's output is computed after it: use limpq")
                features.append(capture.value.detach().flatten(1).numpy())
    finally:
        for p in trainable:
            p.requires_grad_(True)
        for quantizers in quantized.quantizers.values():
            quantizers.statistics = None
        if capture is not None:
            capture.remove()
    return FloatReference(
        statistics,
        np.concatenate(predictions).astype(np.int64),
        int(logits.shape[1]),
        np.concatenate(features) if features else None,
        torch.cat(maps) if maps else None,
    )


class _Trainer:
    """One iteration = one backward per policy, then one clipped SGD step. With `sharpness` (asga)
    the policies' backward runs again at the perturbed point and the step follows the aligned
    gradient."""

    def __init__(self, context: SensitivityContext, quantized: QuantizedCopy, labels: np.ndarray,
                 regularizer: tuple[MarginRegularizer, np.ndarray] | None, reference: FloatReference,
                 attribution_module: nn.Module | None, world_size: int, total_steps: int,
                 sharpness: SharpnessSettings | None = None):
        self.context = context
        self.quantized = quantized
        self.labels = torch.from_numpy(labels)
        self.regularizer = regularizer
        self.float_maps = reference.maps
        self.float_classes = torch.from_numpy(reference.predictions)
        self.parallel = distributed.data_parallel(quantized.model, world_size)
        self.parameters = [p for p in quantized.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(quantized.parameter_groups(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(total_steps, 1),
                                                                   eta_min=MIN_LEARNING_RATE)
        self.features = _InputCapture(_classifier(context, quantized.model)) if regularizer is not None else None
        self.feature_map = OutputCapture(attribution_module) if attribution_module is not None else None
        self.sharpness = sharpness
        self.sharpness_steps: list[SharpnessStep] = []
        self.steps = {id(q.step) for q in quantized.every_quantizer()}

    def step(self, indices: np.ndarray, settings: list[Setting]) -> None:
        inputs = _inputs(self.context, indices, self.quantized.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(inputs, indices, settings)
        for p in self.parameters:
            if p.grad is not None and not p.grad.any():
                # As LIMPQ's loop does: a parameter no pass reached (a BatchNorm copy of a bit-width
                # no layer ran at) sits this iteration out: no momentum, no decay.
                p.grad = None
        if self.sharpness is not None:
            lr = self.optimizer.param_groups[0]["lr"]
            self.sharpness_steps.append(align_gradients(
                self.parameters, self.steps, self.quantized.model, loss,
                lambda: self._backward(inputs, indices, settings),
                self.sharpness.radius(lr, LEARNING_RATE, MIN_LEARNING_RATE), self.sharpness))
        for p in self.parameters:
            if p.grad is not None:
                p.grad.clamp_(-GRAD_CLIP_VALUE, GRAD_CLIP_VALUE)
        self.optimizer.step()
        self.quantized.keep_steps_positive()
        self.schedule.step()

    def _backward(self, inputs: tuple[torch.Tensor, ...], indices: np.ndarray, settings: list[Setting]) -> float:
        """Backpropagates every setting's loss into .grad; returns their sum."""
        total = 0.0
        for setting in settings:
            self.quantized.apply(setting)
            loss = self._loss(inputs, indices)
            loss.backward()
            total += float(loss.detach())
        return total

    def _loss(self, inputs: tuple[torch.Tensor, ...], indices: np.ndarray) -> torch.Tensor:
        logits = self.parallel(*inputs)
        labels = self.labels[indices]
        loss = F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING)
        if self.regularizer is not None:
            regularizer, regularizer_labels = self.regularizer
            features = self.features.value.flatten(1)
            loss = loss + regularizer(features, logits, torch.from_numpy(regularizer_labels[indices]))
        if self.float_maps is not None:
            # Both maps explain the float model's decision: Grad-CAM of the float argmax in each.
            maps = grad_cam(logits, self.feature_map.value, self.float_classes[indices])
            loss = loss + attribution_loss(self.float_maps[indices], maps)
        return loss

    def close(self) -> None:
        for capture in (self.features, self.feature_map):
            if capture is not None:
                capture.remove()


def _supervision(context: SensitivityContext, reference: FloatReference,
                 regularize: bool) -> tuple[np.ndarray, tuple[MarginRegularizer, np.ndarray] | None]:
    """(labels of the cross entropy on the model's logits, (seam regularizer, its labels) or None)."""
    given = context.labels
    if given is not None and len(given) != context.sample_count:
        raise MpqcError(f"{len(given)} proxy labels for {context.sample_count} proxy samples")
    if given is not None and context.labels_match_model and (given.min() < 0 or given.max() >= reference.classes):
        raise MpqcError(f"proxy labels run from {given.min()} to {given.max()} but the model has {reference.classes} "
                        "outputs: labels of other classes need labels_match_model=False")
    # training_labels() with the float argmax already computed by the float pass.
    labels = given.astype(np.int64) if given is not None and context.labels_match_model else reference.predictions
    if not regularize:
        return labels, None
    if given is not None and not context.labels_match_model:
        other = given.astype(np.int64)
        return labels, (MarginRegularizer.fit(reference.features, other, int(other.max()) + 1, proxy_head=True,
                                              terms=context.seam_terms), other)
    return labels, (MarginRegularizer.fit(reference.features, labels, reference.classes, proxy_head=False,
                                          terms=context.seam_terms), labels)


class _InputCapture:
    """Keeps the float input (before its quantizer) and the output of the classifier's last call."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handles = [module.register_forward_pre_hook(self._keep_input, prepend=True),
                         module.register_forward_hook(self._keep_output)]

    def _keep_input(self, _module, args):
        self.value = args[0]

    def _keep_output(self, _module, _args, output):
        self.output = output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _classifier(context: SensitivityContext, model: nn.Module) -> nn.Module:
    """The module of the model's last layer, whose input is the penultimate features."""
    return model.get_submodule(context.layers[-1].name.split("#", 1)[0])


def _float_attribution(model: nn.Module, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float logits, Grad-CAM maps of their argmax), with gradients flowing from the feature map on only."""
    capture: list[torch.Tensor] = []

    def start_graph_here(_module, _args, output):
        capture.append(output.detach().requires_grad_(True))
        return capture[-1]

    handle = module.register_forward_hook(start_graph_here)
    try:
        with torch.enable_grad():
            logits = model(*inputs)
            maps = grad_cam(logits, capture[-1], logits.argmax(dim=1))
    finally:
        handle.remove()
    return logits.detach(), maps.detach()


def _check_classifier_output(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise MpqcError(f"limpq and seam train a classifier (output of shape (N, classes)); this model's output is "
                        f"{shape}: use --method output (the default), qerror or hawq")


def _quantized_choices(names: Sequence[str]) -> list[tuple[int | None, int | None]]:
    """A layer's quantized candidates as distinct (weight bits, activation bits), in candidate order."""
    return list(dict.fromkeys((p.weight_bits, p.activation_bits) for p in map(precision, names) if not p.is_float))


def _uniform_activation_bits(weight_bits: int, offered: list[int | None]) -> int | None:
    """The activation bit-width of a layer in the uniform b-bit policy: b itself where offered, else
    the narrowest quantized one (so activation steps train too), else weight-only."""
    quantized = sorted(a for a in offered if a is not None)
    if weight_bits in quantized:
        return weight_bits
    return quantized[0] if quantized else None


def _inputs(context: SensitivityContext, indices: np.ndarray, channels_last: bool = False) -> tuple[torch.Tensor, ...]:
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(context.feeds[name][indices])) for name in context.input_names)
    if channels_last:
        tensors = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors)
    return tensors


def _prefer_channels_last(model: nn.Module, context: SensitivityContext) -> bool:
    """Puts a model with 2-D convolutions in channels-last layout, which runs their backward two to three
    times faster on CPUs (EfficientNet-Lite0's depthwise convs most of all); True if it did. A model
    that cannot take it (a .view() of a conv output, say) stays as it is."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    model.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            model(*_inputs(context, np.arange(min(2, context.sample_count)), channels_last=True))
    except RuntimeError:
        model.to(memory_format=torch.contiguous_format)
        return False
    return True


def _held_ends(context: SensitivityContext, choices: Mapping[str, list[tuple[int | None, int | None]]]
               ) -> dict[str, tuple[int | None, int | None]]:
    """The first and the last quantized layer -> the setting they are held at: their candidate with
    FIXED_END_BITS weight bits (its widest activations), else their widest candidate."""
    quantized = [layer.name for layer in context.layers if choices.get(layer.name)]
    held = {}
    for layer in dict.fromkeys(quantized[:1] + quantized[-1:]):
        options = choices[layer]
        at_eight = [o for o in options if o[0] == FIXED_END_BITS]
        held[layer] = max(at_eight or options, key=_widest_first)
    return held


def _widest_first(setting: tuple[int | None, int | None]) -> tuple[int, int]:
    """Sort key of (w_bits, a_bits): wider is larger, float activations widest of all."""
    return setting[0] or 0, setting[1] if setting[1] is not None else 99


def _bits_as_text(steps: Mapping[str, Mapping[int, float]]) -> dict[str, dict[str, float]]:
    return {layer: {str(b): s for b, s in per_bits.items()} for layer, per_bits in steps.items()}


def _rms(tensor: torch.Tensor) -> float:
    return math.sqrt(float(tensor.detach().double().pow(2).mean()))
