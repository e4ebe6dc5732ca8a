"""Latency tables are checked against their schema when read: a damaged one is one line naming the
file and the field, and says to delete it and profile again."""

import json
import math
import re

import pytest

from mpqc.costmodel.table import LatencyTable
from mpqc.errors import MpqcError
from mpqc.targets import load_target

GOOD_FIT = {"boundary_ms": {"01": 0.01, "10": -0.002, "11": 0.0}, "boundary_ms_per_million_elements": {"01": 0.3, "10": 0.1, "11": 0.0},
            "overhead_ms": 0.05, "fit_policies": ["uniform:w8a8"], "fit_rms_residual_ms": 0.001}


def _table(tmp_path, **fields) -> LatencyTable:
    """A table written the way `mpqc profile` writes it, then its fields replaced by `fields`."""
    table = LatencyTable.for_target(load_target("ort-cpu"), tmp_path)
    table.record("Conv:sig", "w8a8", 1, {"median_ms": 0.02, "p10_ms": 0.019, "p90_ms": 0.021, "std_ms": 0.001, "runs": 25})
    table.models["model@b1"] = GOOD_FIT
    table.save()
    data = json.loads(table.path.read_text())
    data.update(fields)
    table.path.write_text(json.dumps(data))
    return table


def _refused(tmp_path, message: str, folder=None) -> str:
    with pytest.raises(MpqcError, match=re.escape(message)) as caught:
        LatencyTable.for_target(load_target("ort-cpu"), folder or tmp_path)
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_a_table_as_profile_writes_it_reads_back(tmp_path):
    written = _table(tmp_path)
    read = LatencyTable.for_target(load_target("ort-cpu"), tmp_path)
    assert read.lookup("Conv:sig", "w8a8", 1) == 0.02 and read.models == written.models


@pytest.mark.parametrize(("fields", "message"), [
    ({"entries": None}, "\"entries\" must be an object of layer measurements, not null"),
    ({"entries": [1, 2]}, "\"entries\" must be an object of layer measurements, not [1, 2]"),
    ({"entries": {"Conv:sig@w8a8@b1": {"runs": 25}}}, "entry 'Conv:sig@w8a8@b1' needs \"median_ms\" as a finite number >= 0, not null"),
    ({"entries": {"k": {"median_ms": "fast"}}}, "entry 'k' needs \"median_ms\" as a finite number >= 0, not \"fast\""),
    ({"entries": {"k": {"median_ms": math.nan}}}, "entry 'k' needs \"median_ms\" as a finite number >= 0, not NaN"),
    ({"entries": {"k": {"median_ms": math.inf}}}, "entry 'k' needs \"median_ms\" as a finite number >= 0, not Infinity"),
    ({"entries": {"k": {"median_ms": -0.5}}}, "entry 'k' needs \"median_ms\" as a finite number >= 0, not -0.5"),
    ({"entries": {"k": {"median_ms": True}}}, "entry 'k' needs \"median_ms\" as a finite number >= 0, not true"),
    ({"entries": {"k": 0.5}}, "entry 'k' needs \"median_ms\""),
    ({"models": None}, "\"models\" must be an object of model fits, not null"),
    ({"models": {"m@b1": 3}}, "model fit 'm@b1' must be an object, not 3"),
    ({"models": {"m@b1": GOOD_FIT | {"boundary_ms": [0.1]}}}, "model fit 'm@b1' needs \"boundary_ms\" as an object of edge kind"),
    ({"models": {"m@b1": GOOD_FIT | {"boundary_ms": {"x": 0.1}}}}, "model fit 'm@b1' needs \"boundary_ms\" as an object of edge kind"),
    ({"models": {"m@b1": GOOD_FIT | {"boundary_ms_per_million_elements": {"01": math.nan}}}},
     "model fit 'm@b1' needs \"boundary_ms_per_million_elements\" as an object of edge kind (00, 01, 10, 11) -> finite number"),
    ({"models": {"m@b1": {k: v for k, v in GOOD_FIT.items() if k != "overhead_ms"}}}, "model fit 'm@b1' needs \"overhead_ms\" as a finite number, not null"),
    ({"models": {"m@b1": GOOD_FIT | {"overhead_ms": "1ms"}}}, "model fit 'm@b1' needs \"overhead_ms\" as a finite number, not \"1ms\""),
])
def test_a_field_of_the_wrong_shape_is_named(tmp_path, fields, message):
    table = _table(tmp_path, **fields)
    text = _refused(tmp_path, message)
    assert text.startswith(f"latency table '{table.path}': ") and text.endswith("; delete it and run 'mpqc profile' again")


@pytest.mark.parametrize(("content", "message"), [
    (b"[1, 2, 3]", "holds a JSON array, not an object"),
    (b"42", "holds a JSON number, not an object"),
    (b"null", "holds a JSON null, not an object"),
    (b'{"fingerprint": "caf\xe9"}', "is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'{"entries": ', "is not valid JSON"),
])
def test_a_table_that_is_not_a_json_object_is_one_line(tmp_path, content, message):
    table = _table(tmp_path)
    table.path.write_bytes(content)
    assert "delete it and run 'mpqc profile' again" in _refused(tmp_path, message)


def test_tables_pointing_at_a_file_is_one_line(tmp_path):
    not_a_folder = tmp_path / "tables.json"
    not_a_folder.write_text("{}")
    _refused(tmp_path, f"latency tables folder '{not_a_folder}' is a file; give --tables a folder", folder=not_a_folder)


def test_a_tables_folder_the_file_system_cannot_hold_is_one_line(tmp_path):
    _refused(tmp_path, "cannot be read", folder=tmp_path / ("t" * 300))


def test_the_cli_prints_a_tables_file_as_one_line(tinynet, tmp_path, capsys):
    from mpqc.cli import main

    _, proxy = tinynet
    (tmp_path / "tables.json").write_text("{}")
    argv = ["build", "tinynet:make", "--proxy", str(proxy), "--policy", "search", "--budget-ms", "1", "--tables", "tables.json", "--out", "o"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mpqc: error: latency tables folder 'tables.json' is a file; give --tables a folder (one table per machine lives there)"
