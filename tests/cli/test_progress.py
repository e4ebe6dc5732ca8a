"""Progress shows on a terminal, and only there: a build run on a pseudo-terminal prints its stages
and bars to stderr; with --json, or into a pipe, it prints none of them. A bundled example's build,
profile and cost-model validation show theirs with each stage's duration: on EfficientNet-Lite0 each
takes tens of seconds to minutes, and the same code path runs on mnist-cnn in seconds."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios


def _on_a_terminal(argv, cwd) -> str:
    """stderr of `mpqc argv` when stderr is a terminal (stdout goes to a pipe, as a script reads it)."""
    leader, follower = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide, where tqdm draws nothing: give it a real size.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "mpqc.cli", *argv], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=600)
    os.close(leader)
    shown = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, shown[-2000:]
    return shown


def test_a_build_on_a_terminal_shows_its_stages_and_bars(tinynet, tmp_path):
    spec, proxy = tinynet
    shown = _on_a_terminal(["build", spec, "--proxy", str(proxy), "--policy", "search", "--method", "qerror",
                            "--budget-bitops", "1e12", "--no-cache", "--runs", "3", "--warmup", "0", "--out", "a"], tmp_path)
    for stage in ("mpqc: loading tinynet:make", "mpqc: scoring layers for the search", "mpqc: calibrating",
                  "mpqc: measuring fidelity and latency"):
        assert stage in shown, shown
    assert "mpqc: qerror of" in shown  # the scoring's own bar
    quiet = _on_a_terminal(["build", spec, "--proxy", str(proxy), "--runs", "3", "--warmup", "0", "--out", "b", "--json"], tmp_path)
    assert "mpqc:" not in quiet


def test_progress_stays_out_of_a_pipe(tinynet, tmp_path):
    spec, proxy = tinynet
    done = subprocess.run([sys.executable, "-m", "mpqc.cli", "build", spec, "--proxy", str(proxy), "--runs", "3", "--warmup", "0",
                           "--out", "c"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=True)
    assert done.stderr == ""


# A bundled example's commands (EfficientNet-Lite0's take from tens of seconds to minutes) each say
# what they are doing; mnist-cnn goes through the same stages and bars in seconds.


def test_an_example_build_on_a_terminal_shows_each_stage_with_its_duration(tmp_path):
    shown = _on_a_terminal(["build", "mnist-cnn", "--policy", "uniform:w8a8", "--runs", "3", "--warmup", "0",
                            "--out", "a"], tmp_path)
    for stage in ("loading mnist-cnn", "calibrating", "measuring fidelity and latency"):
        assert f"mpqc: {stage} ..." in shown, shown
        assert re.search(rf"mpqc: {stage}: \d+\.\d s", shown), shown


def test_example_profiling_and_validation_on_a_terminal_show_their_bars(tmp_path):
    tables = ["--tables", str(tmp_path / "tables")]
    profiled = _on_a_terminal(["profile", "mnist-cnn", *tables, "--fit-policies", "0", "--force-fit"], tmp_path)
    assert re.search(r"profiling layers: +\d+%.*\| *\d+/\d+ ", profiled), profiled  # tqdm's bar over its layer measurements
    validated = _on_a_terminal(["costmodel", "validate", "mnist-cnn", *tables, "--policies", "1", "--runs", "5",
                                "--noise-repeats", "2", "--out", "v"], tmp_path)
    assert re.search(r"mpqc: [a-z ]+ policies: +\d+%", validated), validated  # the bar over the 3 uniform + 1 random policies
