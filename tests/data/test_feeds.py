"""Proxy data (`--proxy DATA.npz`) is checked when read: sizes from the archive's headers before any
data is unpacked, no pickles, finite values of sane size; a damaged archive is one line."""

import io
import re
import zipfile

import numpy as np
import pytest

from mpqc.cli import main
from mpqc.data import feeds
from mpqc.data.feeds import MAX_PROXY_BYTES, MAX_PROXY_MAGNITUDE, load_npz
from mpqc.errors import MpqcError


def _refused(path, message: str, **kwargs) -> str:
    with pytest.raises(MpqcError, match=re.escape(message)) as caught:
        load_npz(path, **kwargs)
    text = str(caught.value)
    assert str(path) in text and "\n" not in text
    return text


def _npy_header(shape, descr="<f4") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def _zip_bomb(path, size: int):
    """Deflated zeros, about 1/1000 of `size`, that a plain np.load would unpack into `size` bytes."""
    chunk = b"\0" * 2**20
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("input.npy", "w", force_zip64=True) as member:
            member.write(_npy_header((size // 4,)))
            for _ in range(size // len(chunk)):
                member.write(chunk)
    return path


def _declaring(path, size: int):
    """An archive of a few bytes whose zip directory declares its member `size` bytes long."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", _npy_header((size // 4,)) + b"\0" * 16)
        archive.filelist[0].file_size = size  # written into the central directory on close
    return path


def test_a_proxy_archive_loads_as_before(tmp_path):
    path = tmp_path / "proxy.npz"
    np.savez_compressed(path, input=np.ones((4, 3), np.float32), labels=np.arange(4))
    arrays = load_npz(path)
    assert sorted(arrays) == ["input", "labels"] and arrays["input"].shape == (4, 3) and arrays["input"].flags.writeable
    assert sorted(load_npz(path, only="labels")) == ["labels"] and load_npz(path, only="nothing") == {}


def test_a_zip_bomb_is_refused_by_its_declared_size_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(feeds, "MAX_PROXY_BYTES", 64 * 2**20)  # the real bound takes a 4 GiB bomb
    path = _zip_bomb(tmp_path / "bomb.npz", 96 * 2**20)
    assert path.stat().st_size < 2**20
    monkeypatch.setattr(feeds, "_read_array", lambda *args: pytest.fail("the data was read"))
    _refused(path, "expands to 96 MiB, over mpqc's 64 MiB bound for proxy data; use fewer samples")


def test_an_archive_declaring_more_than_the_bound_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(feeds, "_read_array", lambda *args: pytest.fail("the data was read"))
    _refused(_declaring(tmp_path / "five.npz", 5 * 2**30), "expands to 5.0 GiB, over mpqc's 4.0 GiB bound for proxy data")
    _refused(_declaring(tmp_path / "just.npz", MAX_PROXY_BYTES + 1), "expands to 4.0 GiB, over mpqc's 4.0 GiB bound")


def test_an_npy_header_declaring_more_than_its_member_holds_is_refused(tmp_path):
    """A 10**12-element header over 16 bytes: numpy would size the array from the header."""
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", _npy_header((10**12,)) + b"\0" * 16)
    _refused(path, "array 'input' declares 4000000000000 bytes of data but its archive member holds 16")


def test_the_bounds_are_what_the_module_says():
    assert MAX_PROXY_BYTES == 4 * 2**30
    assert 1e13 < MAX_PROXY_MAGNITUDE < 1e14 and np.isfinite(np.float32(MAX_PROXY_MAGNITUDE) ** 2)


def test_object_arrays_stay_refused(tmp_path):
    path = tmp_path / "pickle.npz"
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, [2]]
    np.savez(path, input=objects)
    _refused(path, "array 'input' holds Python objects (a pickle), which mpqc does not load")


@pytest.mark.parametrize(("values", "message"), [
    (np.array([3e38, 1.0], np.float32), "array 'input' has values up to 3e+38, over mpqc's bound of 1.84e+13"),
    (np.array([-1e20, 1.0], np.float32), "array 'input' has values up to 1e+20"),
    (np.array([1e300], np.float64), "array 'input' has values up to 1e+300"),
    (np.array([np.nan, 1.0], np.float32), "array 'input' contains NaN or infinite values; clean the data"),
    (np.array([1.0, -np.inf], np.float16), "array 'input' contains NaN or infinite values"),
])
def test_values_that_would_overflow_downstream_are_refused(tmp_path, values, message):
    path = tmp_path / "values.npz"
    np.savez(path, input=values)
    _refused(path, message)


def test_large_but_sane_values_and_integers_pass(tmp_path):
    path = tmp_path / "fine.npz"
    np.savez(path, input=np.array([255.0, -1e6], np.float32), ids=np.array([2**62], np.int64), empty=np.zeros((0, 3), np.float32))
    assert load_npz(path)["ids"][0] == 2**62


def test_a_member_that_is_not_an_npy_array_is_refused_and_other_files_are_ignored(tmp_path):
    path = tmp_path / "text.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", b"hello, not an array")
    _refused(path, "member 'input' is not a .npy array")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", _npy_header((2,)) + np.ones(2, np.float32).tobytes())
        archive.writestr("notes.txt", b"calibration images 1-2")
    assert list(load_npz(path)) == ["input"]


def test_truncated_and_bit_flipped_archives_are_one_line(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, input=np.arange(64, dtype=np.float32).reshape(4, 16), labels=np.arange(4))
    data = good.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 5):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        _refused(tmp_path / "cut.npz", "is not a readable .npz archive (arrays keyed by input name)")
    outcomes = set()
    for offset in range(len(data)):  # every byte, one bit: loads the same data, or one line
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        (tmp_path / "flip.npz").write_bytes(bytes(flipped))
        try:
            arrays = load_npz(tmp_path / "flip.npz")
        except MpqcError as exc:
            assert "\n" not in str(exc) and str(tmp_path / "flip.npz") in str(exc)
            outcomes.add("refused")
            continue
        for name, array in arrays.items():  # a flip the zip format ignores (a timestamp, a count)
            np.testing.assert_array_equal(array, np.load(good)[name])
        outcomes.add("same")
    assert outcomes == {"refused", "same"}


def test_a_path_the_file_system_cannot_hold_is_one_line(tmp_path):
    _refused(tmp_path / ("p" * 300 + ".npz"), "is not a readable .npz archive")
    _refused(tmp_path / "missing.npz", "does not exist")


def test_the_cli_prints_refused_proxy_data_as_one_line(tinynet, tmp_path, capsys):
    np.savez(tmp_path / "huge.npz", input=np.full((2, 3, 16, 16), 3e38, np.float32))
    assert main(["build", "tinynet:make", "--proxy", "huge.npz", "--out", "result", "--no-measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpqc: error: proxy data 'huge.npz'") and "3e+38" in err and "\n" not in err
    assert not (tmp_path / "result").exists()
