"""Ctrl-C and SIGTERM stop a launcher the same way, except while it is inside a call an interrupt would wedge."""

from __future__ import annotations

import os
import signal
import time

import pytest

from node.local.children import interrupts_deferred, stop_on_signals


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop_on_signals()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_deferred_block_is_raised_when_the_block_ends(handlers, sig: int) -> None:
    finished = False
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        _deliver(sig)
        with interrupts_deferred():  # nested: held until the outermost block ends
            pass
        finished = True  # the wedge-prone call runs to its end
    assert finished


def test_outside_a_deferred_block_a_signal_interrupts_at_once_and_a_second_sigterm_is_ignored(handlers) -> None:
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGTERM)
    _deliver(signal.SIGTERM)  # during the clean-up: ignored
    with interrupts_deferred():
        pass  # nothing pending
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)  # Ctrl-C still stops it
