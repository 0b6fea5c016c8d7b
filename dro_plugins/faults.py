"""Deterministic crash points for the crash-safety tests: ``DRO_KILL_AT=name`` or ``name:n`` SIGKILLs the process
the n-th time (default the first) the loop reaches the named point. Unset, a crash point does nothing.
``DRO_KILL_SIGNAL`` (e.g. ``SIGTERM``) sends another signal instead, as a scheduler or ``docker stop`` would.

Named points: ``tiny-model-written``, ``warmup``, ``e-step``, ``samples-written``, ``m-step`` (after each M-step batch;
``m-step-selector``, ``m-step-generator``, ``m-step-retriever`` after each role's optimizer step in it), ``validation``,
``metrics-appended``, ``checkpoint-written``, ``checkpoint-swap``, ``best-published``, ``report``.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``DRO_KILL_AT`` names this point (and its count is reached); with several
    processes, only the one whose ``RANK`` is ``DRO_KILL_RANK`` (every process when that is unset)."""
    wanted = os.environ.get("DRO_KILL_AT")
    if not wanted or os.environ.get("DRO_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(count or 1):
        os.kill(os.getpid(), getattr(signal, os.environ.get("DRO_KILL_SIGNAL", "SIGKILL")))
