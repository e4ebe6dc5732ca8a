"""Kernel tests run twice where they can: on CPU tensors under Triton's interpreter, and compiled on a GPU.

TRITON_INTERPRET is read when triton is imported, so it is set here, before any test module
imports it. Without a GPU it defaults to 1; with one it stays off so the "cuda" cases test real
compiled kernels (export TRITON_INTERPRET=1 to test the interpreter on such a machine instead).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
REPO = pathlib.Path(__file__).resolve().parents[2]

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not INTERPRETED, reason="CPU tensors need Triton's interpreter; TRITON_INTERPRET is off because a GPU is present"),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the kernels were checked under Triton's CPU interpreter"),
            pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 would run the interpreter on copies, not compiled GPU code"),
        ],
    ),
]

# Worst error seen per (kernel, mode), as a fraction of the terms' size, printed at the end of the run.
_WORST: dict[str, float] = {}


def pytest_generate_tests(metafunc):
    # A plain parameter rather than a fixture: hypothesis refuses function-scoped fixtures.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


def scaled_error(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor) -> float:
    """max |actual - expected| / (sum |x| |w| + |bias|), per output.

    A float sum's rounding error grows with the size of its terms, not of its result, so this
    bound holds where an output cancels to near zero (a normwise max |expected| did not: one
    output at 1/1300 of its terms' size failed on rounding alone) and it is tight where outputs
    are small. An output with no terms at all must come out exactly.
    """
    diff = (actual.to(torch.float64).cpu() - expected.to(torch.float64).cpu()).abs()
    magnitude = magnitude.to(torch.float64).cpu()
    ratio = torch.where(magnitude > 0, diff / magnitude.clamp_min(torch.finfo(torch.float64).tiny), diff)
    return ratio.max().item() if ratio.numel() else 0.0


@pytest.fixture(scope="session")
def check_close():
    """check_close(label, actual, reference, tolerance, **arguments): compare `actual` with
    reference(**arguments), error scaled by reference(**arguments, absolute=True); assert and record it."""

    def check(label: str, actual: torch.Tensor, reference, tolerance: float, **arguments) -> float:
        expected = reference(**arguments)
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, actual.dtype, expected.shape, expected.dtype)
        error = scaled_error(actual, expected, reference(**arguments, absolute=True))
        _WORST[label] = max(_WORST.get(label, 0.0), error)
        assert error <= tolerance, f"{label}: error {error:.3g} of the terms' size > {tolerance:.3g}"
        return error

    return check


def pytest_terminal_summary(terminalreporter):
    if _WORST:
        terminalreporter.section("INT4 kernels: max error vs the torch references, relative to sum |x||w| + |bias|")
        for label, error in sorted(_WORST.items()):
            terminalreporter.write_line(f"{label:<40} {error:.3e}")


_COMPILE = textwrap.dedent(
    """
    import concurrent.futures, importlib, json, multiprocessing, os, sys

    def compile_one(job):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        module, name = job["kernel"].split(":")
        kernel = getattr(importlib.import_module(module), name)
        signature = dict(job["signature"]) | {key: "constexpr" for key in job["constexprs"]}
        source = ASTSource(fn=kernel, signature=signature, constexprs=job["constexprs"])
        options = {"num_warps": job.get("num_warps", 4)}
        compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=options)
        return {"cubin_bytes": len(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared}

    if __name__ == "__main__":
        jobs = json.loads(sys.argv[1])
        # fork: the workers inherit compile_one from this -c script, which they could not import.
        workers = min(len(jobs), os.cpu_count() or 1)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            print(json.dumps(list(pool.map(compile_one, jobs))))
    """
)


@pytest.fixture(scope="session")
def compile_for_gpu():
    return _compile_for_gpu


# Shared memory one block may use (opt-in maximum): A100 and Jetson Orin 163 KiB, H100 227 KiB.
MAX_SHARED_BYTES = {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024}


def _compile_for_gpu(jobs: list[dict]) -> list[dict]:
    """Compile kernels ahead of time to CUDA cubins, no GPU needed, and check what a launch would.

    Each job: {"kernel": "module:name", "signature": {arg: type}, "constexprs": {...}, "arch": 80,
    "num_warps": 4}. Runs in a fresh interpreter without TRITON_INTERPRET (which replaces kernels
    by Python). Asserts each kernel fits the architecture's shared memory (a launch would fail
    with "out of resources" otherwise) and returns each cubin's size and shared memory.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(jobs)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(compiled) == len(jobs)
    for job, out in zip(jobs, compiled):
        assert out["cubin_bytes"] > 1000, (job, out)
        assert out["shared_bytes"] <= MAX_SHARED_BYTES[job["arch"]], (job, out)
    return compiled
