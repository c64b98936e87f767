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

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from scrollzarr.durable import hidden_partial_path
from scrollzarr.errors import ScrollzarrError

STRIP_BYTES = 8 * 2**20
CLASSIC_TIFF_LIMIT = 2**32 - 2**25  # leave room for the header and tags below 4 GiB


def write_at(fd: int, data: np.ndarray, position: int) -> None:
    """Write all of ``data``'s bytes at ``position`` of the open file ``fd`` (an OSError says why not)."""
    view = np.ascontiguousarray(data).data.cast("B")
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

    def write(self, fd: int, first: int, rows: np.ndarray) -> None:
        """Write ``rows`` (shape (r, width)) as rows ``first … first + r - 1`` of the file open as ``fd``."""
        write_at(fd, rows, self.offset + first * self.row_bytes)


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
