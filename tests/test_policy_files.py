"""Policy files (`--policy policy.json`) are checked when read: anything wrong with one is one line
naming the file and the field, never a traceback."""

import re

import pytest

from mpqc.cli import main
from mpqc.errors import MpqcError
from mpqc.policy import Policy


def _refused(path, message: str) -> str:
    with pytest.raises(MpqcError, match=re.escape(message)) as caught:
        Policy.load(path)
    text = str(caught.value)
    assert str(path) in text and "\n" not in text
    return text


def test_a_saved_policy_loads_back(tmp_path):
    path = tmp_path / "policy.json"
    Policy((("conv1", "w8a8"), ("fc", "fp32")), "uniform:w8a8").save(path)
    assert Policy.load(path) == {"conv1": "w8a8", "fc": "fp32"}


@pytest.mark.parametrize(("content", "message"), [
    (b"not json at all", "is not an mpqc policy (expected JSON with a \"layers\" object)"),
    (b'{"layers": {"conv1": "w8a8"}', "is not an mpqc policy"),
    (b"[1, 2]", "is not an mpqc policy"),
    (b'"layers"', "is not an mpqc policy"),
    (b'{"format": "mpqc.policy/1"}', "is not an mpqc policy"),
    (b'{"layers": ["conv1", "w8a8"]}', "is not an mpqc policy"),
    (b'{"layers": "w8a8"}', "is not an mpqc policy"),
    (b'{"layers": {"conv1": 8}}', "\"layers\" must map layer names to precision names; layer 'conv1' has 8"),
    (b'{"layers": {"conv1": null}}', "\"layers\" must map layer names to precision names; layer 'conv1' has null"),
    (b'{"layers": {"conv1": "w3a3"}}', "\"layers\" gives layer 'conv1' the unknown precision 'w3a3'; use fp32"),
    (b'{"layers": {"a\\nb": "w3a3"}}', "\"layers\" gives layer 'a\\nb' the unknown precision"),
    (b'{"layers": {"conv1": "caf\xe9"}}', "is not UTF-8 text"),
])
def test_a_policy_of_the_wrong_shape_names_the_field(tmp_path, content, message):
    path = tmp_path / "policy.json"
    path.write_bytes(content)
    _refused(path, message)


def test_a_policy_nested_a_thousand_deep_is_one_line(tmp_path):
    """Python's json recurses once per level: this was a RecursionError."""
    path = tmp_path / "deep.json"
    path.write_text('{"layers": ' * 1000 + '"w8a8"' + "}" * 1000)
    _refused(path, "is not an mpqc policy")
    path.write_text("[" * 100_000 + "]" * 100_000)
    _refused(path, "is not an mpqc policy")


def test_a_path_the_file_system_cannot_hold_is_one_line(tmp_path):
    path = tmp_path / ("p" * 300 + ".json")
    _refused(path, "cannot be read (File name too long)")
    _refused(tmp_path / "missing.json", "does not exist")


def test_the_cli_prints_a_bad_policy_file_as_one_line(tinynet, tmp_path, capsys):
    _, proxy = tinynet
    (tmp_path / "deep.json").write_text('{"layers": ' * 1000 + '"w8a8"' + "}" * 1000)
    assert main(["build", "tinynet:make", "--proxy", str(proxy), "--policy", "deep.json", "--out", "result", "--no-measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: ") and "deep.json" in err and "\n" not in err
    assert not (tmp_path / "result").exists()
