"""deferred_interrupts: a Ctrl-C inside the block is raised when the block ends, a second one at once."""

import os
import signal
import threading

import pytest

from mpqc.interrupts import deferred_interrupts


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_inside_the_block_is_raised_when_the_block_ends():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            _ctrl_c()
            finished.append("the block ran on")
    assert finished == ["the block ran on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_is_raised_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            _ctrl_c()
            _ctrl_c()
            reached.append("after the second")
    assert reached == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_block_without_ctrl_c_ends_normally_and_restores_python_s_handler():
    with deferred_interrupts():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_off_the_main_thread_and_under_a_caller_s_own_handler_it_changes_nothing():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_inside_block_handler()))
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]  # signal handlers belong to the main thread
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGINT, mine)
    try:
        with deferred_interrupts():
            assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


def _inside_block_handler():
    with deferred_interrupts():
        return signal.getsignal(signal.SIGINT)
