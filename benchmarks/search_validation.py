"""Does each method's predicted loss rank real policies? `mpqc search validate` on the bundled examples.

For each model, the same random policies are measured once on held-out data and every method is
judged on them: Kendall tau between its predicted loss and the measured error (1 - cosine
against FP32), and the percentile of its ILP policy among the random ones at three BitOps budgets.
Scores are computed afresh (no cache) so the scoring time is each method's real cost here.
The JSON is written after every method, so a long run keeps what it measured. `--update` adds the
methods asked for to an earlier result of the same model, seed and random policies (refused when
the random policies measured differently), keeping its other methods.

    python3 benchmarks/search_validation.py [--models efficientnet-lite0 minilm] [--methods qerror hawq] [--policies 100] [--update]
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
    parser.add_argument("--methods", nargs="*", default=["qerror", "hawq", "limpq", "seam", "asga"])
    parser.add_argument("--policies", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update", action="store_true", help="add these methods to the model's earlier result")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for model in args.models:
        path = RESULTS / f"search_validation_{model}.json"
        earlier = json.loads(path.read_text()) if args.update and path.exists() else None
        options = BuildOptions(model=model, policy="search", seed=args.seed, use_cache=False)
        result = validate_search(options, args.methods, policies=args.policies,
                                 after_method=lambda so_far, path=path, earlier=earlier: _write(path, so_far, earlier))
        result = _write(path, result, earlier)
        for method, r in result["methods"].items():
            if "refused" in r:
                print(f"{model} {method}: refused: {r['refused']}", flush=True)
                continue
            low, high = r["kendall_tau_interval"]
            percentiles = [b.get("percentile_among_random") for b in r["at_budgets"]]
            print(f"{model} {method}: tau {r['kendall_tau_loss_vs_error']:.3f} [{low:.3f}, {high:.3f}], "
                  f"percentiles {percentiles}, scoring {r['scoring_s']:.1f} s", flush=True)
    return 0


def _write(path: pathlib.Path, result: dict, earlier: dict | None) -> dict:
    """Writes `result` (merged into `earlier` when given) and returns what was written."""
    result = result | {"machine": machine(), "versions": versions()}
    if earlier is not None:
        same = [row["fidelity"] for row in earlier["rows"]] == [row["fidelity"] for row in result["rows"]]
        if not same or earlier["seed"] != result["seed"]:
            raise SystemExit(f"{path.name}: the random policies measured differently from the earlier result; "
                             "run without --update to measure every method again")
        run = {"methods": sorted(result["methods"]), "wall_s": result["wall_s"], "machine": result["machine"],
               "versions": result["versions"]}
        result = earlier | {"methods": earlier["methods"] | result["methods"],
                            "updates": earlier.get("updates", []) + [run]}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
