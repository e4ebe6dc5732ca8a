"""Where latency tables are read and written: a per-user folder ($MPQC_TABLES, else the XDG cache),
one subfolder per target; a table shipped beside the target file is read until one is saved there;
--tables names one folder for both."""

import pathlib
import shutil

import pytest

from mpqc.backends.tensorrt.engine import timing_cache_path
from mpqc.cache_folders import measurements_folder
from mpqc.costmodel.table import LatencyTable
from mpqc.errors import MpqcError
from mpqc.targets import load_target

STATS = {"median_ms": 0.02, "p10_ms": 0.019, "p90_ms": 0.021, "std_ms": 0.001, "runs": 25}
TARGETS = pathlib.Path(__file__).resolve().parents[2] / "targets"


@pytest.fixture()
def target_here(tmp_path):
    """ort-cpu as a target file of its own, so a table can be shipped beside it."""
    shutil.copy(TARGETS / "ort-cpu.toml", tmp_path / "ort-cpu.toml")
    return load_target(str(tmp_path / "ort-cpu.toml"))


def _ship(target, ms: float) -> LatencyTable:
    shipped = LatencyTable.for_target(target, target.path.parent / target.name)
    shipped.record("Conv:sig", "w8a8", 1, STATS | {"median_ms": ms})
    shipped.save()
    return shipped


def test_the_folders_follow_mpqc_tables_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQC_TABLES", str(tmp_path / "mine"))
    assert measurements_folder("ort-cpu") == tmp_path / "mine" / "ort-cpu"
    monkeypatch.delenv("MPQC_TABLES")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert measurements_folder("ort-cpu") == tmp_path / "xdg" / "mpqc" / "tables" / "ort-cpu"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset (the XDG rule)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert measurements_folder("trt-a100") == tmp_path / "home" / ".cache" / "mpqc" / "tables" / "trt-a100"


def test_a_profiled_table_is_saved_in_the_users_folder_and_read_back(tmp_path, monkeypatch, target_here):
    monkeypatch.setenv("MPQC_TABLES", str(tmp_path / "mine"))
    table = LatencyTable.for_target(target_here)
    assert table.path.parent == tmp_path / "mine" / "ort-cpu" and not table.entries
    table.record("Conv:sig", "w8a8", 1, STATS)
    table.save()
    assert LatencyTable.for_target(target_here).lookup("Conv:sig", "w8a8", 1) == 0.02
    assert not (target_here.path.parent / "ort-cpu").exists()  # nothing beside the target file


def test_a_table_shipped_beside_the_target_is_read_until_one_is_saved_here(tmp_path, monkeypatch, target_here):
    monkeypatch.setenv("MPQC_TABLES", str(tmp_path / "mine"))
    shipped = _ship(target_here, 0.5)
    shipped_bytes = shipped.path.read_bytes()
    table = LatencyTable.for_target(target_here)
    assert table.lookup("Conv:sig", "w8a8", 1) == 0.5  # read from the shipped table...
    assert table.path == tmp_path / "mine" / "ort-cpu" / shipped.path.name  # ...and saved to the user's folder
    table.record("Gemm:sig", "w8a8", 1, STATS)
    table.save()
    assert shipped.path.read_bytes() == shipped_bytes
    again = LatencyTable.for_target(target_here)
    assert again.lookup("Gemm:sig", "w8a8", 1) == 0.02 and again.lookup("Conv:sig", "w8a8", 1) == 0.5


def test_tables_names_one_folder_for_reading_and_writing(tmp_path, target_here):
    _ship(target_here, 0.5)
    table = LatencyTable.for_target(target_here, tmp_path / "given")
    assert table.path.parent == tmp_path / "given" and not table.entries  # the shipped table is not read either


def test_a_measurements_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch, target_here):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MPQC_TABLES", str(tmp_path / "file"))
    with pytest.raises(MpqcError, match=f"latency tables folder '{tmp_path / 'file'}' is a file; set MPQC_TABLES to a folder"):
        LatencyTable.for_target(target_here)


def test_the_checkout_ships_no_table_and_no_test_writes_the_users_cache():
    assert not list(TARGETS.glob("*/*.json"))  # tables of machines that no longer match were removed
    assert "mpqc-tables" in str(measurements_folder("ort-cpu"))  # tests/conftest.py's session folder


def test_the_tensorrt_timing_cache_sits_beside_the_tables(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt")
    target = load_target("trt-a100")
    monkeypatch.setenv("MPQC_TABLES", str(tmp_path / "mine"))
    assert timing_cache_path(target).parent == tmp_path / "mine" / "trt-a100"
    assert timing_cache_path(target, tmp_path / "given").parent == tmp_path / "given"
