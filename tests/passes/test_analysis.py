"""Frontend mapping, layer discovery, signatures and ties on a real torch export."""

import torch

from mpqc.frontend.torch_export import module_map
from mpqc.passes.analysis import analyze
from mpqc.targets import load_target


def test_layers_are_named_after_their_torch_modules(tinynet):
    spec, _ = tinynet
    analysis = analyze(spec)
    names = [layer.name for layer in analysis.layers]
    assert names == ["conv1", "conv2", "down", "fc"]
    mapping = module_map(analysis.loaded.model)
    assert mapping == {name: name for name in names}


def test_mapping_is_exact_for_linear_layers_exported_as_matmul(tmp_path, monkeypatch):
    # 3-D inputs make the exporter emit MatMul with an anonymous pre-transposed weight.
    (tmp_path / "seqnet.py").write_text(
        "import torch\n"
        "class Seq(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.query = torch.nn.Linear(8, 8)\n"
        "        self.key = torch.nn.Linear(8, 8)\n"
        "        self.out = torch.nn.Linear(8, 4)\n"
        "    def forward(self, x):\n"
        "        return self.out(torch.relu(self.query(x)) * self.key(x))\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return Seq().eval(), torch.randn(1, 5, 8)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    analysis = analyze("seqnet:make")
    by_name = {layer.name: layer for layer in analysis.layers}
    assert set(by_name) == {"query", "key", "out"}
    assert all(layer.op_type == "MatMul" for layer in analysis.layers)
    # The weight of each node is the transposed weight of the module it is named after.
    import seqnet

    module, _ = seqnet.make()
    for name, layer in by_name.items():
        onnx_weight = next(v for v in analysis.model.graph.initializers.values() if v.name == layer.weight)
        torch.testing.assert_close(torch.from_numpy(onnx_weight.const_value.numpy().copy()), getattr(module, name).weight.T.detach())
    assert analysis.ties == [("query", "key")]


def test_signatures_and_ties(tinynet):
    spec, _ = tinynet
    analysis = analyze(spec)
    rows = {row["name"]: row["signature"] for row in analysis.describe_layers(load_target("ort-cpu"))}
    assert rows["conv1"]["kernel"] == (3, 3) and rows["conv1"]["groups"] == 1
    assert rows["down"]["kernel"] == (1, 1)
    assert rows["conv1"]["input_shape"] == ("batch", 3, 16, 16)
    assert rows["fc"]["weight_shape"] == (10, 16)
    assert rows["conv1"]["key"] != rows["conv2"]["key"]
    # conv1 and the shortcut conv read the same tensor: one Q/DQ, one precision.
    assert analysis.ties == [("conv1", "down")]
