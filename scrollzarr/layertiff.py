"""Uncompressed single-image TIFFs written a band of rows at a time, under a temporary name until finished.

The file is laid out in full (header, then the pixels contiguous in row
order, as a sparse file) before any pixel is computed; each band of rows is
then written at its offset (:class:`ImageRows`, a plain value that a task on
another process or machine writes through), so an image larger than memory
never has to be held whole, and bands written by different tasks never share
a byte.  Until :meth:`LayerTiff.commit` renames it, the file carries a
hidden ``.partial`` name that no reader takes for a finished image; :meth:`LayerTiff.flush`
puts it on the disk before that rename.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import tifffile

from scrollzarr.durable import DIRECT_IO_BLOCK, O_DIRECT, aligned_empty, hidden_partial_path, thread_buffer
from scrollzarr.errors import ScrollzarrError

STRIP_BYTES = 8 * 2**20
CLASSIC_TIFF_LIMIT = 2**32 - 2**25  # leave room for the header and tags below 4 GiB
# Bytes a thread copies into its page-aligned buffer for one direct write (a band's rows of one image are 2 MB on
# the benchmark's segment).
DIRECT_BYTES = 4 * 2**20
# Direct writes start and end on memory pages (at least a direct-I/O block): a page holds either bytes written
# directly or bytes written through the page cache, never both.
DIRECT_ALIGN = max(DIRECT_IO_BLOCK, mmap.PAGESIZE)


def write_at(fd: int, data: np.ndarray | memoryview, position: int) -> None:
    """Write all of ``data``'s bytes at ``position`` of the open file ``fd`` (an OSError says why not)."""
    view = (np.ascontiguousarray(data).data if isinstance(data, np.ndarray) else data).cast("B")
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


@dataclass(frozen=True)
class ImageRows:
    """Where the rows of a laid-out image are: what a task needs to write a band of them.

    Attributes
    ----------
    path : Path
        The file being written (its partial name), absolute for tasks on other machines.
    offset : int
        Byte offset of row 0 in the file.
    row_bytes : int
        Bytes of one row (width x item size).
    lock : Path or None
        The lock file of the run writing it (see :meth:`scrollzarr.outputlock.OutputLock.mark`), absolute.
    """

    path: Path
    offset: int
    row_bytes: int
    lock: Path | None = None

    def open(self, direct: bool) -> RowFile:
        """The file, open for :meth:`RowFile.write`: with direct I/O if ``direct`` (see :class:`RowFile`)."""
        return RowFile(self, direct)


class RowFile:
    """A laid-out image open for writing bands of rows: the whole pages of a band with direct I/O, its first and
    last part-pages (which the bands beside it share) through the page cache.

    Why: through the page cache, copying the layers into it was the render's largest cost after sampling (a
    quarter of the benchmark's segment, 1.2 GB of images: 22 % of the CPU time in the kernel's copy into fresh
    page-cache pages, the write() calls at 0.5 GB/s on the build machine); direct I/O hands the disk the
    thread's buffer.  Only for a file whose bands are written one after another: the page cache may hold a
    neighbour's part-page in a larger folio that reaches into this band's pages, which the kernel writes back
    and drops before a direct write, but a buffered write into it at the same moment (a band of another process)
    can leave a stale copy that is written over the direct one.  A file system without direct I/O (tmpfs before
    Linux 6.6, some network ones) gets every byte through the page cache.  The data is on the disk once written
    either way only after :meth:`LayerTiff.sync` (the disk's own cache).
    """

    def __init__(self, rows: ImageRows, direct: bool) -> None:
        self.rows = rows
        self.fd = os.open(rows.path, os.O_WRONLY | os.O_CLOEXEC)
        self.direct = -1
        try:
            self.direct = os.open(rows.path, os.O_WRONLY | os.O_CLOEXEC | O_DIRECT) if O_DIRECT and direct else -1
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                os.close(self.fd)
                raise

    def write(self, first: int, rows: np.ndarray) -> None:
        """Write ``rows`` (shape (r, width)) as rows ``first … first + r - 1``."""
        view = np.ascontiguousarray(rows).data.cast("B")
        start = self.rows.offset + first * self.rows.row_bytes
        end = start + len(view)
        inner = (-(-start // DIRECT_ALIGN) * DIRECT_ALIGN, end // DIRECT_ALIGN * DIRECT_ALIGN)
        if self.direct < 0 or inner[1] <= inner[0]:
            write_at(self.fd, view, start)
            return
        write_at(self.fd, view[: inner[0] - start], start)
        buffer = thread_buffer("rows", lambda: aligned_empty((DIRECT_BYTES,), np.dtype(np.uint8)))
        for position in range(inner[0], inner[1], len(buffer)):
            count = min(len(buffer), inner[1] - position)
            buffer[:count] = view[position - start : position - start + count]
            try:
                write_at(self.direct, buffer[:count], position)
            except OSError as error:  # refused after all (an alignment this disk does not take): the page cache
                if error.errno != errno.EINVAL:
                    raise
                os.close(self.direct)
                self.direct = -1
                write_at(self.fd, view[position - start : inner[1] - start], position)
                break
        write_at(self.fd, view[inner[1] - start :], inner[1])

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct = -1

    def __enter__(self) -> RowFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class LayerTiff:
    """A ``height x width`` image of ``dtype`` being written to ``final``.

    Parameters
    ----------
    final : Path
        The name the image gets once complete.
    height, width : int
    dtype : numpy dtype
    existing : bool
        Open the partial file a stopped render laid out (checked to be this image's) instead of making it.
    """

    def __init__(self, final: Path, height: int, width: int, dtype: np.dtype, existing: bool = False) -> None:
        self.final = final
        self.path = hidden_partial_path(final)
        self.row_bytes = width * dtype.itemsize
        if not existing:
            tifffile.imwrite(
                self.path,
                shape=(height, width),
                dtype=dtype,
                photometric="minisblack",
                bigtiff=height * self.row_bytes > CLASSIC_TIFF_LIMIT,
                rowsperstrip=max(1, STRIP_BYTES // self.row_bytes),
            )
        try:
            with tifffile.TiffFile(self.path) as tiff:
                page = tiff.pages[0]
                same = page.shape == (height, width) and page.dtype == dtype and len(tiff.pages) == 1
                contiguous = page.is_contiguous and sum(page.databytecounts) == height * self.row_bytes
                self.offset = int(page.dataoffsets[0])
                end = self.offset + height * self.row_bytes
        except FileNotFoundError:
            raise ScrollzarrError(f"{self.path} is missing; render again with --overwrite") from None
        except (tifffile.TiffFileError, ValueError, IndexError) as error:  # a file cut short or not a TIFF
            raise ScrollzarrError(f"{self.path} is damaged ({error}); render again with --overwrite") from None
        if existing and not (same and contiguous and os.path.getsize(self.path) >= end):
            raise ScrollzarrError(
                f"{self.path} is not the partial image of this render ({height} x {width} {dtype}, laid out in "
                "full); render again with --overwrite"
            )
        if not contiguous:
            raise ScrollzarrError(f"tifffile did not lay {self.path} out contiguously; cannot write it by rows")
        self._fd = os.open(self.path, os.O_WRONLY)
        self._open = True

    def rows(self, lock: Path) -> ImageRows:
        """Where the file's rows are, for the tasks that write them, and the lock file that holds it (absolute)."""
        return ImageRows(self.path.absolute(), self.offset, self.row_bytes, lock.absolute())

    def flush(self) -> None:
        """Flush the file to the disk and close it (an OSError says why not, e.g. no space left).

        Without the flush, a power cut after the rename can bring the name
        back with an empty file.  Flush every file of a run before renaming
        any: a flush that fails then leaves no final name replaced.
        """
        os.fsync(self._fd)
        self._close()

    def sync(self) -> None:
        """Flush the rows written so far to the disk, keeping the file open."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        """Close the unfinished file and keep it, for ``--resume``."""
        self._close()

    def commit(self) -> None:
        """Give the flushed file its final name (the caller flushes the directory after the renames)."""
        os.replace(self.path, self.final)

    def discard(self) -> None:
        """Close and delete the unfinished file."""
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._open:
            os.close(self._fd)
            self._open = False
