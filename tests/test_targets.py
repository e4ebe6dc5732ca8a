"""Target files: typed [runtime] and [plugins] sections with their defaults in one place."""

import re

import pytest

from mpqc.errors import MpqcError
from mpqc.targets import Plugins, Runtime, find_target_file, load_target


def test_bundled_targets_read_into_typed_sections():
    cpu, gpu = load_target("ort-cpu"), load_target("trt-a100")
    assert cpu.runtime.intra_op_num_threads == 2 and cpu.runtime.session_config == {}
    assert cpu.plugins == Plugins() and not cpu.plugins.int4_conv
    assert gpu.plugins.int4_conv and gpu.runtime.workspace_mib == 4096
    assert gpu.runtime.max_batch == Runtime().max_batch  # a default the file leaves out


def _target_with(tmp_path, extra: str):
    text = find_target_file("ort-cpu").read_text()
    text = text + "\n" + extra + "\n" if extra.startswith("[") else extra + "\n" + text  # a table, or a top-level key
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("section", "message"), [
    ("[plugins]\nint4_conv = 1", "[plugins] int4_conv must be bool, not 1"),
    ("[plugins]\nint4_cnov = true", "unknown [plugins] key(s) int4_cnov"),
    ("plugins = 3", "[plugins] must be a table"),
])
def test_a_section_of_the_wrong_shape_names_the_field(tmp_path, section, message):
    with pytest.raises(MpqcError, match=re.escape(message)):
        load_target(str(_target_with(tmp_path, section)))


def test_runtime_values_are_checked_against_their_types(tmp_path):
    path = tmp_path / "custom.toml"
    text = find_target_file("ort-cpu").read_text()
    path.write_text(text.replace("intra_op_num_threads = 2", 'intra_op_num_threads = "two"'))
    with pytest.raises(MpqcError, match=r"\[runtime\] intra_op_num_threads must be int"):
        load_target(str(path))
    path.write_text(text.replace('graph_optimization_level = "all"', 'graph_optimization_level = "max"'))
    with pytest.raises(MpqcError, match="graph_optimization_level must be one of disable, basic, extended, all"):
        load_target(str(path))
