"""Ctrl-C during training: the run stops between two calls of its compiled rounds.

While `deferred_interrupt()` is active, SIGINT only sets `requested`; the host loop looks
at it after each call (a call lasts about a second), saves a checkpoint, and stops with
`fedjax_sim.errors.Interrupted`. A second Ctrl-C interrupts at once. Outside the main
thread (where signal handlers cannot be installed) Ctrl-C behaves as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class InterruptFlag:
    requested = False


@contextlib.contextmanager
def deferred_interrupt():
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
