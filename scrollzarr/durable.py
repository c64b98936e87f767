"""Making what a run vouches for survive a power cut.

A rename is atomic but not durable: after a power cut, ext4 (and most file
systems) may bring back a renamed file empty, or the old name, unless the
file's data was flushed before the rename and the directory after it.  The
tools flush in batches, before a record or a final name says the data is
there, never file by file where that would cost (see each caller).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directories(directories: Iterable[Path]) -> None:
    """Flush each directory once (its entries: names created, renamed or removed in it)."""
    for directory in sorted(set(directories)):
        fsync_path(directory)


def replace_durably(source: Path, target: Path) -> None:
    """Rename ``source`` (already flushed by the caller) to ``target`` and flush the directory that holds it."""
    os.replace(source, target)
    fsync_path(target.parent)
