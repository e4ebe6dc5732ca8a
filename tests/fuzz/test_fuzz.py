"""A hostile user's inputs, generated: every verb, driven in-process with damaged or odd ONNX,
npz, policy, target, latency-table and option inputs.

Each case asserts what the README promises: no traceback and no internal error, status 2 with one
`mpqc: error:` line for a user error, no --out left behind by a failed command, no staging folder
ever, a bounded time and bounded memory growth (Linux's /proc). CI runs a few dozen cases per input kind; a longer run of the same tier:

    MPQC_FUZZ_EXAMPLES=1000 python3 -m pytest -q tests/fuzz --hypothesis-show-statistics
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from mpqc.cli import main
from mpqc.costmodel.table import LatencyTable
from mpqc.targets import find_target_file, load_target

EXAMPLES = int(os.environ.get("MPQC_FUZZ_EXAMPLES", "12"))
CASE_SECONDS = 60  # a generous bound: a hang or a giant allocation shows as minutes
GROWTH_GIB = 4  # how far one case may raise the process's resident memory above where it started
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _model() -> bytes:
    """A small conv + gemm classifier, valid and quantizable."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.bias"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["output"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


MODEL = _model()


def _proxy(path: pathlib.Path) -> None:
    np.savez(path, input=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))


@contextlib.contextmanager
def _workspace():
    """A fresh folder holding a good model (m.onnx) and proxy data (p.npz); a case damages one of them."""
    with tempfile.TemporaryDirectory() as name:
        folder = pathlib.Path(name)
        (folder / "m.onnx").write_bytes(MODEL)
        _proxy(folder / "p.npz")
        yield folder


def run(argv: list[str], folder: pathlib.Path, may_fail_check: bool = False) -> tuple[int, str]:
    """One command in `folder`; asserts the promises every run keeps, returns (status, stderr)."""
    before = {p.name for p in folder.iterdir()}
    out, err = io.StringIO(), io.StringIO()
    resident = _reset_peak_memory()
    started = time.perf_counter()
    here = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        os.chdir(here)
    elapsed = time.perf_counter() - started
    text = err.getvalue()
    assert elapsed < CASE_SECONDS, f"{argv} took {elapsed:.0f} s"
    growth = _memory_gib("VmHWM") - resident
    assert growth < GROWTH_GIB, f"{argv} raised the resident memory by {growth:.1f} GiB"
    assert "Traceback" not in text and "internal error" not in text, f"{argv}: {text}"
    allowed = {0, 2} | ({1} if may_fail_check else set())
    assert status in allowed, f"{argv} -> {status}: {text}"
    if status == 2:
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("mpqc: error: "), f"{argv}: {text!r}"
        assert not (folder / "o").exists(), f"{argv} left --out behind"
    staging = sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name not in before)
    assert not staging, f"{argv} left {staging}"
    return status, text


def _memory_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from Linux's /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    return 0.0


def _reset_peak_memory() -> float:
    """Start a new peak at the resident memory of now (writing 5 to clear_refs does it); returns it."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _memory_gib("VmRSS")


def _mutated(data: bytes, draw) -> bytes:
    """Truncated, bit-flipped, or spliced: the damage a disk, a download or a hand edit does."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "empty"]))
    if kind == "empty":
        return b""
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flip":
        mutable = bytearray(data)
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            mutable[position] ^= draw(st.integers(1, 255))
        return bytes(mutable)
    start = draw(st.integers(0, len(data)))
    return data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start:]


VERBS = [
    ["inspect", "m.onnx"],
    ["build", "m.onnx", "--proxy", "p.npz", "--no-measure", "--out", "o"],
    ["build", "m.onnx", "--proxy", "p.npz", "--runs", "2", "--warmup", "0", "--out", "o"],
    ["check", "m.onnx"],
    ["bench", "m.onnx", "--runs", "2", "--warmup", "0"],
]


@FUZZ
@given(st.data())
def test_damaged_onnx_files(data):
    with _workspace() as folder:
        (folder / "m.onnx").write_bytes(_mutated(MODEL, data.draw))
        verb = data.draw(st.sampled_from(VERBS))
        run(verb, folder, may_fail_check=verb[0] == "check")


_ARRAYS = st.one_of(
    st.builds(lambda shape, value: np.full(shape, value, np.float32),
              st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple),
              st.sampled_from([0.0, 1.0, np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45])),
    st.builds(lambda shape, dtype: np.zeros(shape, dtype), st.sampled_from([(8, 3, 8, 8), (2, 3, 8), (0, 3, 8, 8)]),
              st.sampled_from([np.int64, np.float64, np.float16, np.uint8, np.bool_, np.complex64])),
)


@FUZZ
@given(st.data())
def test_odd_and_damaged_proxy_data(data):
    with _workspace() as folder:
        if data.draw(st.booleans()):
            (folder / "p.npz").write_bytes(_mutated((folder / "p.npz").read_bytes(), data.draw))
        else:
            key = data.draw(st.sampled_from(["input", "labels", "other"]))
            np.savez(folder / "p.npz", **{key: data.draw(_ARRAYS)})
        run(data.draw(st.sampled_from(VERBS[1:3])), folder)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_POLICIES = st.one_of(
    _JSON.map(lambda value: json.dumps(value).encode()),
    st.dictionaries(st.sampled_from(["conv", "fc", "ghost"]), st.sampled_from(["fp32", "w8a8", "w4a8", "w4a16", "w3a3", 7, None]),
                    max_size=3).map(lambda layers: json.dumps({"layers": layers}).encode()),
    st.integers(100, 3000).map(lambda depth: ("[" * depth + "]" * depth).encode()),
    st.binary(max_size=64),
)


@FUZZ
@given(st.data())
def test_hostile_policy_files(data):
    with _workspace() as folder:
        (folder / "policy.json").write_bytes(data.draw(_POLICIES))
        verb = data.draw(st.sampled_from(["build", "export"]))
        run([verb, "m.onnx", "--proxy", "p.npz", "--policy", "policy.json", "--no-measure", "--out", "o"], folder)


_TOML_VALUES = st.sampled_from(['"big"', "0", "-64", "99999999999", "1.5", "true", "[]", "{}", "[1, 2]", '"w8a8"',
                                "nan", "inf", '"\\u00e9"', "100000", '["fp32", "w9a9"]'])


def _target_text(draw) -> bytes:
    text = find_target_file(draw(st.sampled_from(["ort-cpu", "trt-a100"]))).read_text()
    lines = text.splitlines()
    keyed = [i for i, line in enumerate(lines) if "=" in line and not line.lstrip().startswith("#")]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.sampled_from(keyed))
        lines[i] = lines[i].split("=", 1)[0] + "= " + draw(_TOML_VALUES)
    damaged = "\n".join(lines).encode()
    return _mutated(damaged, draw) if draw(st.booleans()) else damaged


@FUZZ
@given(st.data())
def test_hostile_target_files(data):
    with _workspace() as folder:
        (folder / "t.toml").write_bytes(_target_text(data.draw))
        verb = data.draw(st.sampled_from([["inspect", "m.onnx"], ["build", "m.onnx", "--proxy", "p.npz", "--no-measure", "--out", "o"],
                                          ["profile", "m.onnx", "--proxy", "p.npz", "--fit-policies", "0", "--tables", "tables"]]))
        status, _ = run([*verb, "--target", "t.toml"], folder)
        assert status == 2 or verb[0] != "profile" or (folder / "tables").is_dir()


_TABLES = st.one_of(
    _JSON.map(lambda value: json.dumps(value)),
    st.builds(lambda entries, models: json.dumps({"format": "mpqc.latency_table/1", "fingerprint": "FP", "entries": entries,
                                                  "models": models}),
              st.one_of(st.none(), st.dictionaries(st.text(max_size=6), _JSON, max_size=3)),
              st.one_of(st.none(), st.dictionaries(st.text(max_size=6), _JSON, max_size=2))),
)


@FUZZ
@given(st.data())
def test_hostile_latency_tables(data):
    with _workspace() as folder:
        table = LatencyTable.for_target(load_target("ort-cpu"), folder / "tables")
        table.path.parent.mkdir(parents=True)
        text = data.draw(_TABLES).replace('"FP"', json.dumps(table.fingerprint))
        table.path.write_bytes(_mutated(text.encode(), data.draw) if data.draw(st.booleans()) else text.encode())
        verb = data.draw(st.sampled_from([
            ["build", "m.onnx", "--proxy", "p.npz", "--policy", "search", "--budget-ms", "1", "--method", "qerror",
             "--no-measure", "--no-cache", "--tables", "tables", "--out", "o"],
            ["profile", "m.onnx", "--proxy", "p.npz", "--fit-policies", "0", "--tables", "tables"],
        ]))
        run(verb, folder)


_OPTION_VALUES = st.sampled_from(["-1", "0", "1", "1e22", str(2**31), "nan", "inf", "-inf", "1e308", "abc", "", "3.5",
                                  "99999999999999999999"])
_OPTIONS = ["--seed", "--runs", "--warmup", "--batch", "--proxy-limit", "--percentile", "--epochs", "--budget-ms", "--budget-speedup",
            "--budget-bitops", "--budget-bytes"]


@FUZZ
@given(st.data())
def test_numeric_options(data):
    with _workspace() as folder:
        chosen = data.draw(st.lists(st.sampled_from(_OPTIONS), min_size=1, max_size=3, unique=True))
        argv = ["build", "m.onnx", "--proxy", "p.npz", "--no-measure", "--out", "o"]
        for option in chosen:
            argv += [option, data.draw(_OPTION_VALUES)]
        if any(option.startswith("--budget") for option in chosen) and data.draw(st.booleans()):
            argv += ["--policy", "search", "--method", "qerror", "--no-cache"]
        run(argv, folder)


@pytest.mark.parametrize("spec", [":", "math:pi", "json:loads", "os:getcwd", "no_such_module:make", "m.onnx:make"])
def test_model_specs_that_are_no_factory(tmp_path, spec):
    (tmp_path / "m.onnx").write_bytes(MODEL)
    status, text = run(["inspect", spec], tmp_path)
    assert status == 2, text
