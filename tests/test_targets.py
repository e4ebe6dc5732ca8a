"""Target files: typed [runtime] and [plugins] sections with their defaults in one place."""

import re

import pytest

from mpqc.errors import MpqcError
from mpqc.targets import Plugins, Runtime, find_target_file, load_target


def test_bundled_targets_read_into_typed_sections():
    cpu, gpu = load_target("ort-cpu"), load_target("trt-a100")
    assert cpu.runtime.intra_op_num_threads == 2 and cpu.runtime.session_config == {
        "optimization.disable_specified_optimizers": "SkipLayerNormFusion"}
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


def _replaced(tmp_path, base: str, old: str, new: str):
    """A copy of bundled target `base` with one line changed (the line must be there)."""
    text = find_target_file(base).read_text()
    assert old in text
    path = tmp_path / f"{base}-custom.toml"
    path.write_text(text.replace(old, new))
    return path


def _refused(path, message: str) -> str:
    with pytest.raises(MpqcError, match=re.escape(message)) as caught:
        load_target(str(path))
    text = str(caught.value)
    assert str(path) in text and "\n" not in text
    return text


@pytest.mark.parametrize(("value", "shown"), [
    ('"big"', "'big'"), ("0", "0"), ("-64", "-64"), ("99999999999", "99999999999"), ("48", "48"), ("512", "512"),
    ("64.0", "64.0"), ("true", "True"),
])
def test_int4_block_size_takes_only_sizes_the_runtimes_accept(tmp_path, value, shown):
    """99999999999 once sized a 3.6 TiB allocation; 48 and 512 are no MatMulNBits block length."""
    path = _replaced(tmp_path, "ort-cpu", "int4_block_size = 64", f"int4_block_size = {value}")
    _refused(path, f"[lowering] int4_block_size must be one of 16, 32, 64, 128, 256 for backend onnxruntime, not {shown}")


def test_tensorrt_targets_take_int4_blocks_of_64_or_128(tmp_path):
    _refused(_replaced(tmp_path, "trt-a100", "int4_block_size = 64", "int4_block_size = 32"),
             "[lowering] int4_block_size must be one of 64, 128 for backend tensorrt, not 32")
    assert load_target(str(_replaced(tmp_path, "trt-a100", "int4_block_size = 64", "int4_block_size = 128"))).int4_block_size == 128
    assert load_target(str(_replaced(tmp_path, "ort-cpu", "int4_block_size = 64", "int4_block_size = 32"))).int4_block_size == 32


def test_the_tensorrt_block_sizes_are_the_rules_checkers():
    from mpqc.backends.tensorrt.rules import INT4_BLOCK_SIZES
    from mpqc.targets import _INT4_BLOCK_SIZES

    assert _INT4_BLOCK_SIZES["tensorrt"] == INT4_BLOCK_SIZES


def _minimal_target(tmp_path, key: str, value: str):
    """A small target file with `key = value` at the top, in place of that key or table."""
    top = {"name": '"custom"', "backend": '"onnxruntime"', "device": '"cpu"'}
    tables = {"deploy": 'Conv = ["fp32", "w8a8"]', "lowering": "quantize_layer_outputs = true"}
    top.pop(key, None)
    tables.pop(key, None)
    lines = [f"{key} = {value}"] + [f"{k} = {v}" for k, v in top.items()] + [f"[{k}]\n{v}" for k, v in tables.items()]
    path = tmp_path / "custom.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("key", "value", "message"), [
    ("evaluate", "1", "[evaluate] must be a table of op type -> list of precision names, not 1"),
    ("deploy", "1", "[deploy] must be a table of op type -> list of precision names, not 1"),
    ("deploy", '{ Conv = "w8a8" }', "[deploy] 'Conv' must be a list of precision names, not 'w8a8'"),
    ("deploy", "{ Conv = [8] }", "[deploy] 'Conv' must be a list of precision names, not [8]"),
    ("deploy", '{ Conv = [["w8a8"]] }', "[deploy] 'Conv' must be a list of precision names"),
    ("evaluate", '{ Conv = ["w3a3"] }', "[evaluate] 'Conv' lists unknown precision(s) ['w3a3']; use fp32"),
    ("name", "5", "name must be a non-empty string, not 5"),
    ("name", '""', "name must be a non-empty string, not ''"),
    ("name", '"../elsewhere"', "name must be a plain name without folders, not '../elsewhere'"),
    ("backend", "[]", "backend must be a non-empty string, not []"),
    ("device", "0", "device must be a non-empty string, not 0"),
    ("lowering", "2", "[lowering] must be a table"),
])
def test_top_level_values_of_the_wrong_shape_name_the_field(tmp_path, key, value, message):
    assert load_target(str(_minimal_target(tmp_path, "description", '"fine"'))).deploy == {"Conv": ("fp32", "w8a8")}
    _refused(_minimal_target(tmp_path, key, value), message)


@pytest.mark.parametrize(("old", "new", "message"), [
    ("quantize_layer_outputs = true", "quantize_layer_outputs = 1", "[lowering] quantize_layer_outputs must be true or false, not 1"),
    ("quantize_layer_outputs = true", 'quantize_layer_outputs = "yes"', "[lowering] quantize_layer_outputs must be true or false, not 'yes'"),
    ("int4_block_size = 64", "int4_blocksize = 128", "unknown [lowering] key(s) int4_blocksize"),
    ('activation_type = "uint8"', "activation_type = 8", "[lowering] activation_type must be int8 or uint8, not 8"),
])
def test_lowering_values_are_typed(tmp_path, old, new, message):
    _refused(_replaced(tmp_path, "ort-cpu", old, new), message)


@pytest.mark.parametrize(("base", "old", "new", "message"), [
    ("ort-cpu", "intra_op_num_threads = 2", "intra_op_num_threads = 100000", "[runtime] intra_op_num_threads must be between 0 and 1024, not 100000"),
    ("ort-cpu", "intra_op_num_threads = 2", "intra_op_num_threads = -1", "[runtime] intra_op_num_threads must be between 0 and 1024, not -1"),
    ("ort-cpu", "inter_op_num_threads = 1", "inter_op_num_threads = -4", "[runtime] inter_op_num_threads must be between 0 and 1024, not -4"),
    ("trt-a100", "workspace_mib = 4096", "workspace_mib = 0", "[runtime] workspace_mib must be between 1 and 1048576, not 0"),
    ("trt-a100", "workspace_mib = 4096", "workspace_mib = -5", "[runtime] workspace_mib must be between 1 and 1048576, not -5"),
    ("trt-a100", "strongly_typed = true", "strongly_typed = true\nmax_batch = 0", "[runtime] max_batch must be between 1 and 4096, not 0"),
    ("trt-a100", "builder_optimization_level = 3", "builder_optimization_level = 6", "[runtime] builder_optimization_level must be between 0 and 5, not 6"),
    ("trt-a100", "builder_optimization_level = 3", "builder_optimization_level = -1", "[runtime] builder_optimization_level must be between 0 and 5, not -1"),
    ("trt-a100", 'timing_cache = "trt-a100.timing.cache"', 'timing_cache = "../../outside.cache"', "[runtime] timing_cache must be a file name without folders"),
    ("ort-cpu", "session_config = {", 'session_config = { "a" = [1],', "[runtime] session_config entry 'a' must be a string, not [1]"),
])
def test_runtime_values_are_checked_against_their_ranges(tmp_path, base, old, new, message):
    _refused(_replaced(tmp_path, base, old, new), message)


def test_the_edges_of_the_runtime_ranges_load(tmp_path):
    path = _replaced(tmp_path, "trt-a100", "builder_optimization_level = 3", "builder_optimization_level = 5\nmax_batch = 4096")
    assert load_target(str(path)).runtime.max_batch == 4096
    assert load_target(str(_replaced(tmp_path, "ort-cpu", "intra_op_num_threads = 2", "intra_op_num_threads = 0"))).runtime.intra_op_num_threads == 0


def test_a_target_file_that_is_not_utf8_or_nests_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(find_target_file("ort-cpu").read_bytes() + '# caf\xe9\n'.encode("latin-1"))
    _refused(path, "is not UTF-8 text")
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    _refused(path, "is not valid TOML")


def test_a_target_name_the_file_system_cannot_hold_is_one_line():
    for name in ("t" * 300 + ".toml", "t" * 300):
        with pytest.raises(MpqcError, match="cannot be looked up") as caught:
            load_target(name)
        assert "\n" not in str(caught.value)


def test_the_cli_prints_a_bad_target_file_as_one_line(tinynet, tmp_path, capsys):
    from mpqc.cli import main

    _, proxy = tinynet
    _replaced(tmp_path, "ort-cpu", "int4_block_size = 64", "int4_block_size = 99999999999")
    assert main(["build", "tinynet:make", "--proxy", str(proxy), "--target", "ort-cpu-custom.toml", "--out", "o", "--no-measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: target 'ort-cpu-custom.toml': [lowering] int4_block_size must be one of") and "\n" not in err
    assert not (tmp_path / "o").exists()
