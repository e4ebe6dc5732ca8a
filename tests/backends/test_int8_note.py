"""Builds measured on an x86 CPU without VNNI say that ONNX Runtime's INT8 kernels saturate there."""

import json

import pytest

from mpqc.backends.onnxruntime import runner as ort_runner
from mpqc.cli import main
from mpqc.targets import load_target


def _cpu(monkeypatch, arch, features):
    monkeypatch.setattr(ort_runner, "machine", lambda: {"cpu": "test CPU", "cores": 2, "system": "Linux",
                                                         "arch": arch, "int8_features": features})


@pytest.mark.parametrize("arch, features, noted", [
    ("x86_64", ["avx2"], True),
    ("x86_64", ["avx2", "avx512bw"], True),
    ("x86_64", ["avx2", "avx512bw", "avx512_vnni"], False),
    ("x86_64", ["avx2", "avx_vnni"], False),
    ("aarch64", ["asimddp"], False),
])
def test_only_x86_cpus_without_vnni_get_the_note(monkeypatch, arch, features, noted):
    _cpu(monkeypatch, arch, features)
    target = load_target("ort-cpu")
    note = ort_runner.int8_saturation_note(target)
    assert (note is not None) == noted
    if noted:
        assert note.startswith(f"this CPU has no VNNI ({', '.join(features)}): ONNX Runtime's INT8 kernels saturate here")
        assert ort_runner.int8_saturation_note(ort_runner.with_exact_int8(target, True)) is None  # the exact kernels are asked for


def test_a_measured_int8_build_carries_the_note_and_a_float_one_does_not(monkeypatch, tmp_path, capsys):
    _cpu(monkeypatch, "x86_64", ["avx2"])
    common = ["--runs", "2", "--warmup", "1"]
    assert main(["build", "mnist-cnn", "--policy", "uniform:w8a8", "--out", str(tmp_path / "int8"), *common]) == 0
    assert "  note: this CPU has no VNNI (avx2)" in capsys.readouterr().out
    record = json.loads((tmp_path / "int8" / "build.json").read_text())
    assert record["measured"]["int8_note"].endswith("for exact, slower kernels")
    assert main(["build", "mnist-cnn", "--policy", "uniform:fp32", "--out", str(tmp_path / "fp32"), *common]) == 0
    assert "note:" not in capsys.readouterr().out
    assert "int8_note" not in json.loads((tmp_path / "fp32" / "build.json").read_text())["measured"]
