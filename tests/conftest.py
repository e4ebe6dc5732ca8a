"""Shared fixtures: a tiny residual torch model (exported by mpqc's own frontend) and its proxy data."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

TINYNET = textwrap.dedent(
    """
    import torch

    class TinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.down = torch.nn.Conv2d(3, 16, 1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.conv2(y) + self.down(x))
            return self.fc(y.mean((2, 3)))

    def make():
        torch.manual_seed(0)
        model = TinyNet()
        with torch.no_grad():
            model.bn1.running_mean.uniform_(-0.5, 0.5)
            model.bn1.running_var.uniform_(0.5, 2.0)
        return model.eval(), torch.randn(1, 3, 16, 16)
    """
)


@pytest.fixture(scope="session", autouse=True)
def _measurements_in_a_temporary_folder(tmp_path_factory):
    """Latency tables a test profiles go to a folder of the test session's, never the user's cache.

    Session-wide, so module-scoped fixtures and the mpqc processes tests start see it too.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPQC_TABLES", str(tmp_path_factory.mktemp("mpqc-tables")))
        yield


@pytest.fixture()
def tinynet(tmp_path, monkeypatch):
    """Writes tinynet.py and proxy.npz into a working folder and returns (spec, proxy path)."""
    (tmp_path / "tinynet.py").write_text(TINYNET)
    np.savez(tmp_path / "proxy.npz", input=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # search builds cache scores: not in ~/.cache
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tinynet:make", tmp_path / "proxy.npz"


@pytest.fixture()
def tinynet_onnx(tinynet, tmp_path):
    """The tiny model as an .onnx file (no torch module behind it) and its proxy: (model path, proxy path)."""
    import onnx

    from mpqc.passes.analysis import analyze

    spec, proxy = tinynet
    path = tmp_path / "tinynet.onnx"
    onnx.save(analyze(spec).loaded.model, path)
    return str(path), str(proxy)
