"""An exclusive lock on an output directory for the whole of a run.

Two runs writing one output interleave: each believes it owns the files, and
one of them can exit 0 with a store whose arrays the other deleted.  Every tool
that writes an output directory holds this lock from before its first write to
after its last.  It is an advisory ``flock`` on a hidden file inside the
directory, so the kernel releases it when the process dies in any way
(``kill -9`` included) and no stale lock ever needs clearing by hand.

The lock file is removed when the run ends, with the classic protocol that
keeps this safe: a process that obtains the lock checks that the name still
refers to the file it locked (another run may have removed it meanwhile) and
tries again if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from scrollzarr.errors import ScrollzarrError

LOCK_NAME = ".scrollzarr.lock"


class LockedError(ScrollzarrError):
    """Another run holds the output."""


class OutputLock:
    """Hold ``directory`` (created if missing) for one run; a context manager.

    Parameters
    ----------
    directory : Path
        The output directory (a zarr store, or a folder of TIFFs).
    what : str
        How the error calls the output, e.g. ``"output store"``.
    name : str
        The lock file's name in ``directory``: :data:`LOCK_NAME` to hold the
        whole directory, another to hold one file of it (``subject``).
    subject : Path or None
        What the error names as held: ``directory`` unless given.

    Raises
    ------
    LockedError
        On entry, if another process holds the lock.
    """

    def __init__(
        self, directory: Path, what: str = "output", name: str = LOCK_NAME, subject: Path | None = None
    ) -> None:
        self.directory = directory
        self.what = what
        self.subject = directory if subject is None else subject
        self.path = directory / name
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> OutputLock:
        self._make_directory()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                self._remove_created()
                raise LockedError(
                    f"another run is writing the {self.what} {self.subject} (it holds {self.path}); "
                    "wait for it to finish or stop it, then run again"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)  # the holder before us removed the file as it finished: lock the new one

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    @property
    def created(self) -> tuple[Path, ...]:
        """The directories this lock created (the output and missing parents), outermost first.

        A run flushes the parent of each before it reports success: else a power cut can lose the new
        directory's own entry, and every file in it with it.
        """
        return tuple(self._created)

    def mark(self, run: str) -> None:
        """Write ``run`` (an identifier of this run) into the lock file, flushed, for :func:`holder`.

        Tasks of a run on other processes or machines ask the lock who holds the
        output before they write into it: a task left running by a stopped run
        then finds another run's mark (or no lock file) and writes nothing.
        """
        assert self._fd is not None, "mark() needs the lock held"
        data = run.encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)  # on a shared file system, what other machines read

    def release(self) -> None:
        """Remove the lock file and release the lock (and the directory, if this run created it and left it empty)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _make_directory(self) -> None:
        """Create the directory and any missing parents, remembering which, so that a failed run removes them."""
        missing = []
        here = self.directory
        while not here.exists() and here != here.parent:
            missing.append(here)
            here = here.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue  # made meanwhile by someone else: not ours to remove
            self._created.append(path)

    def _remove_created(self) -> None:
        """Remove the directories this lock created, innermost first, where they are still empty."""
        for path in reversed(self._created):
            try:
                path.rmdir()
            except OSError:
                break
        self._created.clear()


def holder(path: Path) -> str | None:
    """The run that marked the lock file ``path`` (:meth:`OutputLock.mark`); ``None`` if there is no lock file or
    no mark."""
    try:
        return path.read_bytes().decode(errors="replace") or None
    except FileNotFoundError:
        return None
