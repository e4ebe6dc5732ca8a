"""Layer-wise errors of a uniform w8a8 build against FP32, and what keeping the worst layers float gains.

Runs the two commands a user would, in a temporary folder:

    mpqc build MODEL --target ort-cpu --policy uniform:w8a8 --out DIR
    mpqc compare DIR --keep-float K --json

    python benchmarks/compare_layers.py [--model efficientnet-lite0] [--keep-float 3]

Writes benchmarks/results/compare_<model>.json: every quantized layer's output SQNR and cosine
(worst first), the model's fidelity as built, with each of the worst K layers kept fp32, and with
all K. Every number in it is measured by this run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

from mpqc.files import write_atomically
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def mpqc(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "mpqc.cli", *argv, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mpqc {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def summary(compared: dict) -> dict:
    """The headline numbers, copied from the compare result: the worst layers and each trial's change."""
    keep = compared["keep_float"]
    return {
        "worst_layers": [{key: row[key] for key in ("name", "op_type", "sqnr_db", "cosine_mean", "input_sqnr_db")}
                         for row in compared["layers"][:5]],
        "fidelity_before": keep["before"],
        "trials": [{"fp32_layers": trial["fp32_layers"], "fidelity": trial["fidelity"], "change": trial["change"]}
                   for trial in keep["trials"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--keep-float", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        out = str(pathlib.Path(folder) / "build")
        built = mpqc("build", args.model, "--target", "ort-cpu", "--policy", "uniform:w8a8", "--out", out)
        compared = mpqc("compare", out, "--keep-float", str(args.keep_float))
    compared["build"] = "DIR"  # the temporary folder is gone
    record = {"benchmark": "compare_layers", "model": args.model, "target": "ort-cpu", "policy": "uniform:w8a8",
              "keep_float": args.keep_float, **provenance(),
              "build_fidelity": built["build"]["measured"]["fidelity"], "summary": summary(compared), "compare": compared}
    print(json.dumps(record["summary"], indent=1), flush=True)
    path = write_atomically(RESULTS / f"compare_{args.model}.json", json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
