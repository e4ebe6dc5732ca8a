"""`package.module:factory` specs that name no usable factory: one line, never a traceback."""

import textwrap

import pytest

from mpqc.cli import main

FACTORIES = textwrap.dedent(
    """
    import torch

    def raises():
        raise RuntimeError("weights not found at /data/w.pt\\nsee the log")

    def strings():
        return "model", "input"

    def module_only():
        return torch.nn.Linear(2, 2)

    def no_inputs():
        return torch.nn.Linear(2, 2), ()

    def number_inputs():
        return torch.nn.Linear(2, 2), 5

    def wants_a_path(path):
        return path
    """
)

SPECS = [
    (":", "names no factory"),
    ("specfactories:", "names no factory"),
    ("math:pi", "'math:pi' is a float, not a factory"),
    ("json:loads", "factory 'json:loads' needs arguments"),
    ("specfactories:wants_a_path", "needs arguments"),
    ("specfactories:raises", "factory 'specfactories:raises' raised RuntimeError: weights not found at /data/w.pt"),
    ("specfactories:strings", "not (str, str)"),
    ("specfactories:module_only", "must return (torch module, example inputs), not Linear"),
    ("specfactories:no_inputs", "not (Linear, tuple of 0 items)"),
    ("specfactories:number_inputs", "not (Linear, int)"),
    ("specbroken:make", "importing 'specbroken' raised ValueError: broken on import"),
    ("specfactories:absent", "cannot load factory"),
]


@pytest.mark.parametrize(("spec", "message"), SPECS, ids=[s for s, _ in SPECS])
def test_a_spec_without_a_usable_factory_is_one_line(tmp_path, monkeypatch, capsys, spec, message):
    (tmp_path / "specfactories.py").write_text(FACTORIES)
    (tmp_path / "specbroken.py").write_text("raise ValueError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: ") and "\n" not in err, err
    assert message in err


def test_an_exported_model_holds_no_path_of_this_machine(tinynet):
    """Its hash keys latency-table fits and the score cache: it must not depend on where mpqc is installed."""
    import pathlib

    import mpqc
    from mpqc.frontend.resolve import resolve_model

    spec, _ = tinynet
    loaded = resolve_model(spec)
    assert str(pathlib.Path(mpqc.__file__).parent).encode() not in loaded.model.SerializeToString()
    assert all(p.key != "pkg.torch.onnx.stack_trace" for node in loaded.model.graph.node for p in node.metadata_props)
