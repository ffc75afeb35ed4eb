"""Ctrl-C and SIGTERM for a command that writes files (run, export, score): a stop, never a kill.

Python's defaults end the process at once on SIGTERM (exit 143, not a word said) and raise
KeyboardInterrupt wherever the program is on SIGINT (a traceback). While `caught()` is held, the
first SIGINT or SIGTERM is recorded and handed to whoever listens (a run's dispatch stops sending and
lets the requests in flight land); whatever is being written is finished (every file is replaced
atomically), and the command exits 3 saying so. A second one quits at once, exit 3, with a line
saying so: what is half-written is a temporary file, which the next run or export removes.

The handler runs in the main thread between bytecodes, and when a blocking call (the event loop's
select) is interrupted (PEP 475), so a listener on a running event loop hands its work over with
`loop.call_soon_threadsafe`, which wakes the loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import NoReturn

from batchrunner.errors import EXIT_STOPPED

SIGNALS = (signal.SIGINT, signal.SIGTERM)
QUIT_WITHIN_S = 3.0  # after a second signal, the process exits within this, whatever its last words were doing

Listener = Callable[[signal.Signals], None]


class Interrupts:
    """The first SIGINT or SIGTERM of a command, once it has come, and who is told of it."""

    def __init__(self, *, hard_exit: bool = True) -> None:
        # A second signal ends the process (the CLI); without hard_exit (the Python API: a notebook's kernel, an
        # application's process) it gives up on the requests in flight and the run returns at once instead.
        self.hard_exit = hard_exit
        self.received: signal.Signals | None = None
        self._listeners: list[Listener] = []
        self._last_words: Callable[[], None] | None = None

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with the first signal (at once, if it has come); returns what stops the listening."""
        self._listeners.append(listener)
        if self.received is not None:
            listener(self.received)

        def stop_listening() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop_listening

    def before_quitting(self, last_words: Callable[[], None] | None) -> None:
        """What a second signal does before the process exits (a run records the requests on its wire and commits
        them; it calls `quit()` when done). Without it, or if it takes longer than QUIT_WITHIN_S, the process
        exits at once."""
        self._last_words = last_words

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        received = signal.Signals(signum)
        if self.received is not None and not self.hard_exit:  # the second, in a process that must live on
            os.write(2, f"{received.name} again: giving up on the requests in flight; the run returns now\n".encode())
            if self._last_words is not None:
                self._last_words()
            return
        if self.received is not None:  # the second: the user wants out now
            line = (
                f"{received.name} again: quitting at once (exit 3); the checkpoint keeps every answer it had "
                "committed and the output is as it was; rerun to continue\n"
            )
            os.write(2, line.encode())
            if self._last_words is None:
                quit_now()
            deadline = threading.Timer(QUIT_WITHIN_S, quit_now)
            deadline.daemon = True
            deadline.start()
            self._last_words()
            return
        self.received = received
        for listener in list(self._listeners):
            listener(received)

    def quit(self) -> None:
        """After a second signal's last words: exit at once (hard_exit), else nothing (the run is returning)."""
        if self.hard_exit:
            quit_now()


def quit_now() -> NoReturn:
    """Exit at once (a second signal), exit 3."""
    os._exit(EXIT_STOPPED)


_held: Interrupts | None = None  # the Interrupts of the `caught()` block the process is in


@contextlib.contextmanager
def caught(*, hard_exit: bool = True) -> Iterator[Interrupts]:
    """SIGINT and SIGTERM recorded for the block, the handlers before it put back after it. Reentrant: a block
    inside another shares the outer one's Interrupts. Outside the main thread nothing can be installed (and
    signals go to the main thread): the Interrupts then never receives one, and is the thread's own (a run on a
    worker thread must not take, or lend, the main thread's)."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield Interrupts(hard_exit=hard_exit)
        return
    if _held is not None:
        yield _held
        return
    interrupts = Interrupts(hard_exit=hard_exit)
    previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}
    for signum in SIGNALS:
        previous[signum] = signal.signal(signum, interrupts._on_signal)
    _held = interrupts
    try:
        yield interrupts
    finally:
        _held = None
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Python's own handlers for the block (a question asked on the terminal, which Ctrl-C should abort at once),
    then the `caught()` block's again."""
    previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}
    with contextlib.suppress(ValueError):  # not the main thread
        if _held is not None:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def received() -> signal.Signals | None:
    """The signal the current `caught()` block received, if it has received one."""
    return _held.received if _held is not None else None
