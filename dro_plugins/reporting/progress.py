"""The progress hook that long loops report through; the CLI gives it Rich bars, the library default is silent."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol


class Track(Protocol):
    """``track(iterable, description, total, size=None)`` yields the items of ``iterable`` and shows progress.

    ``total`` counts items, or with ``size`` (item -> questions in it) questions, so rates read as questions/s.
    """

    def __call__(
        self, iterable: Iterable, description: str, total: int, size: Callable[[Any], int] | None = None
    ) -> Iterable: ...


def no_progress(iterable: Iterable, _description: str, _total: int, size: Callable[[Any], int] | None = None) -> Iterable:
    """The silent :class:`Track`."""
    return iterable
