"""The fuzz tier (tests/fuzz) at length: N generated cases per input kind, counted.

    python benchmarks/fuzz.py [--examples 850] [--out benchmarks/results/fuzz.json]

Runs the same tests CI runs, with MPQC_FUZZ_EXAMPLES=N, and records hypothesis's own counts of
passing and failing cases per test, the wall time, and pytest's verdict. The generation is
seeded (derandomized), so a run repeats exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

from mpqc.files import write_atomically
from mpqc.versions import provenance

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=850)
    parser.add_argument("--out", default=str(RESULTS / "fuzz.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz",
                           "--hypothesis-show-statistics"], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"MPQC_FUZZ_EXAMPLES": str(args.examples)})
    tests, current = {}, None
    for line in done.stdout.splitlines():
        name = re.match(r"tests/fuzz/test_fuzz.py::(\w+):$", line)
        if name:
            current = name.group(1)
        counts = re.search(r"(\d+) passing examples, (\d+) failing examples, (\d+) invalid examples", line)
        if counts and current:
            passing, failing, invalid = map(int, counts.groups())
            tests[current] = {"passing": passing, "failing": failing, "rejected_by_generation": invalid}
    summary = next((line for line in reversed(done.stdout.splitlines()) if " passed" in line or " failed" in line), "")
    result = {
        "format": "mpqc.fuzz/1",
        "examples_per_test": args.examples,
        "cases": sum(t["passing"] + t["failing"] for t in tests.values()),
        "failing": sum(t["failing"] for t in tests.values()),
        "tests": tests,
        "pytest": {"status": done.returncode, "summary": summary.strip("= ")},
        "wall_s": time.perf_counter() - started,
        "provenance": provenance(),
    }
    write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{result['cases']} cases, {result['failing']} failing; pytest: {result['pytest']['summary']} -> {args.out}")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
