"""Ctrl-C at random moments of a build: every run must end in the one line `mpqc: interrupted`
(status 130) with no --out (or, signalled after the final rename, a complete one) and no staging
folder left, or finish with a complete build.

    python benchmarks/interrupts.py [--runs 20] [--model mnist-cnn] [--seed 0] [--out FILE]

Each run starts `mpqc build` as its own process and sends SIGINT after a delay drawn uniformly
between 0.2 s and the length of one uninterrupted build (measured first), so the signal lands in
model export, calibration, lowering, measurement and the final write alike.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from mpqc.files import write_atomically
from mpqc.versions import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BUILD_FILES = {"model.qdq.onnx", "policy.json", "build.json", "report.md"}


def _build(model: str, out: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpqc.cli", "build", model, "--runs", "20", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _verdict(process: subprocess.Popen, folder: pathlib.Path, out: pathlib.Path) -> dict:
    _, err = process.communicate(timeout=600)
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    complete = files is not None and BUILD_FILES <= set(files)
    lines = [line for line in err.splitlines() if line.strip()]
    if process.returncode == 130:  # stopped: nothing written, or (a signal after the rename) all of it
        ok = lines == ["mpqc: interrupted"] and (files is None or complete) and not left
    else:
        ok = process.returncode == 0 and complete and not left
    return {"status": process.returncode, "stderr_lines": lines[-3:], "out": "complete" if complete else files,
            "staging_left": left, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "interrupts.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = pathlib.Path(name)
        started = time.perf_counter()
        full = _build(args.model, folder / "full")
        full.communicate(timeout=900)
        build_s = time.perf_counter() - started
        delays = np.random.default_rng(args.seed).uniform(0.2, build_s, size=args.runs)
        for i, delay in enumerate(delays):
            out = folder / f"run{i}"
            process = _build(args.model, out)
            time.sleep(float(delay))
            process.send_signal(signal.SIGINT)
            rows.append({"delay_s": float(delay)} | _verdict(process, folder, out))
            print(f"run {i}: SIGINT after {delay:.1f} s -> status {rows[-1]['status']}, ok {rows[-1]['ok']}", flush=True)
    result = {
        "format": "mpqc.interrupts/1",
        "model": args.model,
        "uninterrupted_build_s": build_s,
        "runs": len(rows),
        "interrupted": sum(r["status"] == 130 for r in rows),
        "finished": sum(r["status"] == 0 for r in rows),
        "ok": sum(r["ok"] for r in rows),
        "rows": rows,
        "provenance": provenance(),
    }
    write_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{result['ok']}/{result['runs']} runs ended cleanly ({result['interrupted']} interrupted, "
          f"{result['finished']} finished first) -> {args.out}")
    return 0 if result["ok"] == result["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
