"""Atomic file writes (a reader, or a resumed run after ``kill -9``, sees the old file or the new one, never half),
and why a path cannot be read as a file.

Each write goes to a temporary file beside the target, is flushed to disk (``fsync``), and replaces the target
with ``os.replace``, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def why_not_a_file(path: Path) -> str:
    """Why ``path`` cannot be read as a file, in words: a folder, a dangling or looping symbolic link, or missing."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    if path.is_symlink():
        return "is a symbolic link that leads nowhere (or to itself)"
    return "file not found"
