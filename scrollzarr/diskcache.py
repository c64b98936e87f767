"""An on-disk cache of fetched objects, shared by runs and processes, the least recently used out first.

Each object is one file named by the SHA-256 of its key, written under a
temporary name and renamed, so that a reader (another run, another process)
sees a whole file or none; a trailer of its length and CRC-32C lets a file
that a power cut or a full disk left short read as a miss, not as voxels.
A hit touches the file: its modification time is its last use.  The bound
is kept by the process that crosses it: it lists the cache (every process's
files) and removes the files used longest ago until a tenth is free.  Only
files of the cache's own naming (a folder of two hex digits, a file of 62)
are ever counted or removed: ``--cache_dir`` may name a folder that holds
other files, and they are not the cache's to delete.  The folder is tagged
with a ``CACHEDIR.TAG``, so that backup tools leave it out.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import struct
import threading
import uuid
from pathlib import Path

import google_crc32c

log = logging.getLogger(__name__)

TAG = "CACHEDIR.TAG"  # https://bford.info/cachedir/
TAG_TEXT = "Signature: 8a477f597d28d172789f06886806bc55\n# scrollzarr's cache of remote volume chunks\n"
FOLDER = re.compile(r"^[0-9a-f]{2}$")
FILE = re.compile(r"^[0-9a-f]{62}$")
TRAILER = struct.Struct("<QI")  # the object's length in bytes and its CRC-32C
PARTIAL = ".partial-"  # the temporary names of files being written
KEEP = 0.9  # an eviction leaves the cache at this fraction of its bound, so that it lists the cache rarely


class DiskCache:
    """Objects by key in ``directory``, at most about ``max_bytes`` of them.

    Parameters
    ----------
    directory : Path
        Made if missing.  Several caches (processes, runs, volumes) may share it.
    max_bytes : int
        Bound on the bytes of the files in ``directory``.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.hits = 0
        self._lock = threading.Lock()
        self._full = False
        # A new cache folder is the user's alone: it may hold what a login fetched (scroll_serve --proxy)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (directory / TAG).exists():
            (directory / TAG).write_text(TAG_TEXT)
        self._bytes = sum(size for _, size, _ in self._files())

    def get(self, key: str) -> bytes | None:
        """The object stored under ``key``, or ``None`` (never stored, evicted, or damaged: then removed)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        body, trailer = data[: -TRAILER.size], data[-TRAILER.size :]
        if len(trailer) < TRAILER.size or TRAILER.unpack(trailer) != (len(body), google_crc32c.value(body)):
            log.warning("removed the damaged cache file %s (fetched again)", path)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile: the bytes read are whole
            os.utime(path)
        with self._lock:
            self.hits += 1
        return body

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``.  A disk that is full or read-only stops the caching (with one warning),
        not the run."""
        if self._full:
            return
        path = self._path(key)
        partial = path.with_name(f"{PARTIAL}{uuid.uuid4().hex}")
        trailer = TRAILER.pack(len(data), google_crc32c.value(data))
        try:
            path.parent.mkdir(exist_ok=True)
            # The user's alone (0600), as what a login fetched may be in it, whatever the folder's mode
            with open(partial, "wb", opener=lambda name, flags: os.open(name, flags, 0o600)) as file:
                file.write(data)
                file.write(trailer)
            os.replace(partial, path)
        except OSError as error:  # a full disk, a read-only or forbidden folder: the render goes on without
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            self._full = True
            log.warning("the disk cache %s cannot take more (%s); fetching on without it", self.directory, error)
            return
        with self._lock:
            self._bytes += len(data) + TRAILER.size
            over = self._bytes > self.max_bytes
        if over:
            self._evict()

    def _evict(self) -> None:
        """Remove the files used longest ago (every process's) until the cache holds ``KEEP`` of its bound."""
        with self._lock:
            files = sorted(self._files())
            total = sum(size for _, size, _ in files)
            for _, size, path in files:
                if total <= KEEP * self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
            self._bytes = total

    def _files(self) -> list[tuple[int, int, Path]]:
        """Modification time (ns), size and path of every cached file (others' files being written left out)."""
        found = []
        for folder in os.scandir(self.directory):
            if not (FOLDER.match(folder.name) and folder.is_dir(follow_symlinks=False)):
                continue
            for entry in os.scandir(folder.path):
                if not FILE.match(entry.name):  # files being written, and anything not the cache's
                    continue
                try:
                    status = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((status.st_mtime_ns, status.st_size, Path(entry.path)))
        return found

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.directory / digest[:2] / digest[2:]
