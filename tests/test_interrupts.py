"""Ctrl-C and SIGTERM as a stop (interrupts.py): recorded, told to listeners, the handlers put back."""

from __future__ import annotations

import os
import signal

from batchrunner import interrupts


def test_a_signal_is_recorded_told_to_listeners_and_the_handlers_are_put_back() -> None:
    """The first SIGTERM is recorded and handed to each listener (one that comes later hears it at once); an inner
    block shares the outer one; paused() gives Python's own handlers back for a question; on leaving, the
    handlers from before are back."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    heard: list[signal.Signals] = []
    with interrupts.caught() as caught:
        with interrupts.caught() as inner:
            assert inner is caught
        stop_listening = caught.listen(heard.append)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
        assert caught.received is signal.SIGTERM and interrupts.received() is signal.SIGTERM
        assert heard == [signal.SIGTERM]
        late: list[signal.Signals] = []
        caught.listen(late.append)
        assert late == [signal.SIGTERM]
        stop_listening()
        with interrupts.paused():
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert interrupts.received() is None
