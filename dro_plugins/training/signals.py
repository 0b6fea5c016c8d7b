"""Stopping a run cleanly: the first Ctrl-C (SIGINT) or SIGTERM (what schedulers, ``docker stop`` and ``timeout``
send) asks the loop to stop at the next batch boundary, where it saves a checkpoint; a second signal aborts at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from dro_plugins.training.session import Session

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(session: Session):
    """Within the block, SIGINT and SIGTERM set ``session.stop_requested``; a second one raises KeyboardInterrupt.

    Outside the main thread (where Python cannot install handlers) the block runs with the default handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, _frame):
        if session.stop_requested:
            raise KeyboardInterrupt
        session.stop_requested = True
        name = signal.Signals(signum).name
        session.log(f"{name}: stopping after this batch and saving (send it again to abort without saving)")

    previous = {number: signal.signal(number, request_stop) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
