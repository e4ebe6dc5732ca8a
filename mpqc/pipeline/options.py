"""What a user asked `mpqc build`/`export` for, and the stage settings derived from it.

BuildOptions mirrors the command line; it stops here. Stages get the frozen values below it.
"""

from __future__ import annotations

import dataclasses

from mpqc.bench.latency import MeasureSettings
from mpqc.data.proxy import ProxySource
from mpqc.errors import MpqcError
from mpqc.lower.lowering import CalibrationSettings
from mpqc.search.problem import Budgets
from mpqc.sensitivity.methods import DEFAULT_METHOD, TRAINED_METHODS

# Options only `--policy search` reads, with the flag that sets each (for the error that names it).
SEARCH_ONLY = {"method": "--method", "iterations": "--iterations", "epochs": "--epochs", "gmpq": "--gmpq", "fixed_ends": "--fixed-ends",
               "seam_terms": "--seam-terms", "budget_ms": "--budget-ms",
               "budget_speedup": "--budget-speedup", "budget_bitops": "--budget-bitops",
               "budget_bytes": "--budget-bytes", "pareto": "--pareto"}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: str
    target: str = "ort-cpu"
    policy: str = "uniform:w8a8"
    proxy: str | None = None  # .npz keyed by input name; bundled examples bring their own
    proxy_limit: int | None = None
    calibration: str = "minmax"
    percentile: float = 99.99
    seed: int = 0
    evaluate_only: bool = False  # allow precisions the target can only evaluate, not deploy
    bias_correction: bool = True
    # --policy search: the ILP chooses per layer under these budgets (any combination).
    method: str | None = None  # sensitivity method; None: DEFAULT_METHOD (output)
    # Indicator training (limpq, seam): an iteration budget (None: INDICATOR_ITERATIONS), or passes
    # over the proxy data where `epochs` is given instead.
    iterations: int | None = None
    epochs: int | None = None
    gmpq: bool = False  # add the attribution-imitation term to indicator training
    fixed_ends: bool = False  # indicator training holds the first and last layer at 8 bits (LIMPQ)
    seam_terms: tuple[float, float, float] | None = None  # seam's (margin, compactness, margin weight); None: SEAM_TERMS
    budget_ms: float | None = None
    budget_speedup: float | None = None  # a latency budget of the measured FP32 latency / this
    budget_bitops: float | None = None
    budget_bytes: float | None = None
    tables: str | None = None  # folder of latency tables (default: mpqc.cache_folders, and those shipped with the target)
    pareto: str | None = None  # "ms", "bitops" or "bytes": also write the loss-vs-cost front of that resource
    cache_dir: str | None = None  # sensitivity score cache (default: $XDG_CACHE_HOME/mpqc or ~/.cache/mpqc)
    use_cache: bool = True
    measure: bool = True  # time FP32 vs built and compute fidelity
    metric: str | None = None  # package.module:function, the user's own fidelity evaluator
    batch: int = 1
    runs: int = 100
    warmup: int = 10

    @property
    def searches(self) -> bool:
        return self.policy == "search"

    def search_only_flags_given(self) -> list[str]:
        """The search-only flags set although the policy is not searched."""
        defaults = BuildOptions(model=self.model)
        return [flag for field, flag in SEARCH_ONLY.items() if getattr(self, field) != getattr(defaults, field)]

    def check_consistent(self) -> None:
        """Refuse options that contradict each other before any work starts."""
        if self.budget_speedup is not None and (self.budget_ms is not None or self.pareto == "ms"):
            raise MpqcError("--budget-speedup sets the latency budget itself: drop --budget-ms (or --pareto ms)")
        if self.budget_speedup is not None and not self.measure:
            raise MpqcError("--budget-speedup is relative to the FP32 latency measured on this machine: drop --no-measure")
        if self.iterations is not None and self.epochs is not None:
            raise MpqcError("--iterations and --epochs both set how long indicators train: give one")
        if self.searches:
            self.check_training_flags([self.method or DEFAULT_METHOD])
        if self.seam_terms is not None and self.method != "seam":
            raise MpqcError(f"--seam-terms sets SEAM's terms, and the method is '{self.method or 'output'}': "
                            "drop it, or pass --method seam")
        if self.searches:
            return
        given = self.search_only_flags_given()
        if given:
            raise MpqcError(f"{', '.join(given)} only apply to --policy search, and the policy is '{self.policy}': "
                            "drop them, or pass --policy search")

    def check_training_flags(self, methods: list[str]) -> None:
        """Refuse --iterations, --epochs, --gmpq and --fixed-ends where none of `methods` trains indicators."""
        training = [flag for flag, given in (("--iterations", self.iterations is not None), ("--epochs", self.epochs is not None),
                                             ("--gmpq", self.gmpq), ("--fixed-ends", self.fixed_ends)) if given]
        if training and not any(method in TRAINED_METHODS for method in methods):
            named = f"the method is '{methods[0]}'" if len(methods) == 1 else "the methods are " + ", ".join(f"'{m}'" for m in methods)
            raise MpqcError(f"{', '.join(training)} set how indicators train, and {named}, which trains none: "
                            f"drop them, or pass --method {' or '.join(TRAINED_METHODS)}")

    def proxy_source(self) -> ProxySource:
        return ProxySource(self.proxy, self.proxy_limit)

    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(self.calibration, self.percentile, self.bias_correction)

    def budgets(self) -> Budgets:
        return Budgets(self.budget_ms, self.budget_bitops, self.budget_bytes)

    def measure_settings(self) -> MeasureSettings:
        return MeasureSettings(self.batch, self.runs, self.warmup)
