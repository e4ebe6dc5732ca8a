"""mpqc.files.write_atomically: all of the new content or all of the old, never a torn file."""

from __future__ import annotations

import stat

import pytest

from mpqc.files import write_atomically


def test_writes_text_and_bytes_readable_by_all(tmp_path):
    path = write_atomically(tmp_path / "deep" / "table.json", "{}\n")
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.json"]  # no temporary left behind


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")

    class Unencodable(str):
        def encode(self, *args, **kwargs):
            raise RuntimeError("interrupted halfway")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomically(path, Unencodable("new"))
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
