"""Does each method's predicted loss rank real policies? `mpqc search validate` on the bundled examples.

For each model, the same random policies are measured once on held-out data and every method is
judged on them: Kendall tau between its predicted loss and the measured error (1 - cosine
against FP32), and the percentile of its ILP policy among the random ones at three BitOps budgets.
Scores are computed afresh (no cache) so the scoring time is each method's real cost here.

    python3 benchmarks/search_validation.py [--models efficientnet-lite0 minilm] [--methods qerror hawq] [--policies 100]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from mpqc.pipeline.options import BuildOptions
from mpqc.pipeline.search_validate import validate_search
from mpqc.versions import machine, versions

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["efficientnet-lite0", "minilm"])
    parser.add_argument("--methods", nargs="*", default=["qerror", "hawq", "limpq", "seam"])
    parser.add_argument("--policies", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for model in args.models:
        options = BuildOptions(model=model, policy="search", seed=args.seed, use_cache=False)
        result = validate_search(options, args.methods, policies=args.policies)
        result |= {"machine": machine(), "versions": versions()}
        (RESULTS / f"search_validation_{model}.json").write_text(json.dumps(result, indent=2) + "\n")
        for method, r in result["methods"].items():
            low, high = r["kendall_tau_interval"]
            percentiles = [b.get("percentile_among_random") for b in r["at_budgets"]]
            print(f"{model} {method}: tau {r['kendall_tau_loss_vs_error']:.3f} [{low:.3f}, {high:.3f}], "
                  f"percentiles {percentiles}, scoring {r['scoring_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
