"""report.html in a real browser: headless Chromium loads a searched build's page, and its front,
per-layer strip and search section are there, with every plot decoded."""

import re
import shutil
import subprocess

import pytest

from mpqc.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian's chromium package): the page was not loaded")


def _chromium(*args: str) -> str:
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)
    return done.stdout


def test_a_searched_build_s_page_shows_its_front_strip_and_search(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["build", "mnist-cnn", "--policy", "search", "--method", "qerror", "--pareto", "bitops",
                 "--runs", "5", "--warmup", "1", "--out", "b"]) == 0
    page = (tmp_path / "b" / "report.html").resolve().as_uri()
    dom = _chromium("--dump-dom", page)
    for element in ("front", "layer-strip"):
        assert re.search(rf'<img id="{element}"[^>]*data-loaded="yes"', dom), f"plot {element} was not decoded"
    assert '<section id="search">' in dom and "qerror" in dom and "Latency (measured" in dom
    assert "http" not in dom.replace("http://www.w3.org", "")  # self-contained: nothing to fetch
    _chromium("--window-size=1200,2400", f"--screenshot={tmp_path / 'page.png'}", page)
    assert (tmp_path / "page.png").stat().st_size > 50_000  # a drawn page, not a blank one
