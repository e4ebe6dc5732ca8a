"""A screenshot of report.html for a searched build of a bundled example, taken by headless Chromium.

    python benchmarks/report_page.py [--model mnist-cnn] [--out benchmarks/results/report_mnist-cnn.png]

The build is a qerror --pareto bitops search with latency and fidelity measured on this machine;
the page shows what that build measured and predicted.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

from mpqc.cli import main as mpqc

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--out")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("benchmarks/report_page.py: no chromium here (apt-get install chromium): nothing taken")
        return 1
    out = pathlib.Path(args.out or RESULTS / f"report_{args.model}.png").resolve()
    with tempfile.TemporaryDirectory() as folder:
        build = pathlib.Path(folder) / "build"
        status = mpqc(["build", args.model, "--policy", "search", "--method", "qerror", "--pareto", "bitops", "--no-cache",
                       "--out", str(build)])
        if status != 0:
            return status
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400",
                        "--virtual-time-budget=5000", f"--screenshot={out}", (build / "report.html").as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
