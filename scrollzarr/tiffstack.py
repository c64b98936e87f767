"""Find a directory's z-slice TIFFs, check their headers, and read rows of them.

A stack is a directory of single-image TIFFs whose names end in the slice
number (``00000.tif``, ``scan_0123.tiff``); the number is the z index.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import FileIO
from pathlib import Path

import numpy as np
import tifffile

from scrollzarr.errors import ScrollzarrError

log = logging.getLogger(__name__)

NUMBERED_TIFF = re.compile(r"(\d+)\.tiff?$", re.IGNORECASE)
_NO_COMPRESSION = 1


class StackError(ScrollzarrError):
    """The TIFF directory cannot be converted as it is."""


@dataclass(frozen=True)
class SliceFile:
    """One z slice on disk.

    Attributes
    ----------
    z : int
        Slice number, taken from the file name.
    path : Path
    data_offset : int or None
        Byte offset of the pixel data when it is stored uncompressed and
        contiguous (rows can then be read directly); ``None`` otherwise.
    decode_rows : int
        Rows decoded at a time to read any row: 0 for directly readable data,
        the rows per strip for compressed strips, all rows for anything else
        (tiles), which is decoded whole.
    byteorder : str
        ``"<"`` or ``">"``, this file's byte order (ImageJ writes big-endian
        TIFFs, so one stack can hold both).
    identity : (int, int, int, int)
        Device, inode, size (bytes) and modification time (ns) of the file
        whose header was checked; every read checks that it is still that file.
    """

    z: int
    path: Path
    data_offset: int | None
    decode_rows: int
    byteorder: str
    identity: tuple[int, int, int, int]


@dataclass(frozen=True)
class TiffStack:
    """A checked stack of z slices, all of one shape and dtype.

    Attributes
    ----------
    slices : dict of int to SliceFile
        The slices that exist, by slice number.
    shape : (int, int)
        Rows and columns (y, x) of every slice.
    dtype : numpy.dtype
        Pixel type of every slice (native byte order; each file's own is in its :class:`SliceFile`).
    bad : tuple of int
        Slice numbers whose files could not be used (``--bad_slices zero``).
    """

    slices: dict[int, SliceFile]
    shape: tuple[int, int]
    dtype: np.dtype
    bad: tuple[int, ...] = ()

    def missing_runs(self, z0: int, z1: int) -> list[tuple[int, int]]:
        """Runs ``[start, stop)`` of slice numbers in ``[z0, z1)`` that have no file (bad slices not counted).

        As many runs as gaps between files, however many numbers they hold.
        """
        runs, start = [], z0
        for z in sorted({*self.slices, *self.bad}):
            if start < z < z1:
                runs.append((start, z))
            start = max(start, z + 1)
        if start < z1:
            runs.append((start, z1))
        return runs

    @property
    def decode_bytes(self) -> int:
        """Bytes of the largest piece decoded at once to read rows of any slice (0: none decoded)."""
        rows = max(entry.decode_rows for entry in self.slices.values())
        return rows * self.shape[1] * self.dtype.itemsize


def numbered_tiffs(directory: Path) -> dict[int, Path]:
    """Map slice numbers to the TIFF files of ``directory`` whose names end in a number.

    Raises
    ------
    StackError
        If the directory is missing, holds no numbered TIFF, or two files
        carry the same number.
    """
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise StackError(f"input directory {directory} {what}; give the folder that holds the z-slice TIFFs")
    found: dict[int, Path] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        match = NUMBERED_TIFF.search(entry.name)
        if match is None:
            continue  # a directory or dangling link with a slice's name is kept: it is reported as a bad slice
        z = int(match.group(1))
        if z in found:
            raise StackError(
                f"slice {z} appears twice: {found[z].name} and {entry.name} in {directory}; "
                "remove or rename one of them"
            )
        found[z] = Path(entry.path)
    if not found:
        raise StackError(
            f"no TIFF files named by slice number (such as 00000.tif) in {directory}; check the input directory"
        )
    return found


def pixel_data_end(page: tifffile.TiffPage) -> int:
    """Byte offset just past the last strip or tile of ``page``: the file must be at least this long."""
    return max((int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)), default=0)


def _inspect(z: int, path: Path) -> tuple[tuple[int, int], np.dtype, SliceFile]:
    """Read one TIFF's header: its shape, dtype and how to read it.

    Raises
    ------
    StackError
        Saying what is wrong with the file: not a readable file, not one 2D
        grey-scale image, truncated, or compressed with an unknown codec.
    """
    if path.is_symlink() and not path.exists():
        raise StackError(
            f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; "
            "restore the file it points to or remove the link"
        )
    if path.is_dir():
        raise StackError(f"{path}: a directory, not a TIFF file; move it out of the input directory")
    try:
        with open(path, "rb") as handle, tifffile.TiffFile(handle) as tif:
            identity = _identity(os.fstat(handle.fileno()))
            pages = len(tif.pages)
            if pages > 1:
                raise StackError(
                    f"{path}: holds {pages} images (pages), which is a stack, not one z slice; "
                    "write one image per z slice, one file each"
                )
            page = tif.pages.first
            if len(page.shape) != 2 or page.samplesperpixel != 1:
                raise StackError(
                    f"{path}: holds an image of shape {page.shape}, not a single-channel 2D slice; "
                    "each z slice must be one grey-scale image"
                )
            end = pixel_data_end(page)
            if end > identity[2]:
                raise StackError(
                    f"{path}: truncated, its pixel data should end at byte {end} but the file has "
                    f"{identity[2]} bytes; copy or download this slice again"
                )
            if page.compression != _NO_COMPRESSION:
                try:
                    tifffile.TIFF.DECOMPRESSORS[page.compression]
                except KeyError as missing:
                    raise StackError(
                        f"{path}: compressed with {page.compression.name}, which cannot be decoded here "
                        f"({missing.args[0]}); install imagecodecs or decompress the slices first"
                    ) from None
            direct = (
                page.compression == _NO_COMPRESSION
                and page.is_contiguous
                and not page.is_tiled
                and int(sum(page.databytecounts)) == page.size * page.dtype.itemsize
            )
            height = int(page.shape[0])
            if direct:
                offset, decode_rows = int(page.dataoffsets[0]), 0
            else:
                offset, decode_rows = None, height if page.is_tiled else min(int(page.rowsperstrip), height)
            entry = SliceFile(z, path, offset, decode_rows, tif.byteorder, identity)
            return (height, int(page.shape[1])), np.dtype(page.dtype), entry
    except StackError:
        raise
    except Exception as error:  # tifffile raises many types for damaged files
        raise StackError(f"{path}: cannot read the TIFF header ({error}); check or replace this slice") from None


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    """Device, inode, size (bytes) and modification time (ns): what tells a file from its replacement."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


class SliceChanged(Exception):
    """A slice's file is not the one whose header was checked."""


class SliceReadError(StackError):
    """A slice that cannot be read; ``changed``: because its file is not the one whose header was checked."""

    def __init__(self, message: str, changed: bool) -> None:
        super().__init__(message)
        self.changed = changed


@contextmanager
def _open_checked(entry: SliceFile) -> Iterator[FileIO]:
    """Open ``entry``'s file for reading, unbuffered, if it is still the file whose header was checked.

    A file renamed into place (rsync, a re-export) or rewritten since has
    another inode, size or modification time; its pixels are not where the
    checked header said, so it must not be read with that header.

    Raises
    ------
    SliceChanged
        If the file is not the one checked.
    """
    with open(entry.path, "rb", buffering=0) as handle:
        now = _identity(os.fstat(handle.fileno()))
        if now != entry.identity:
            (_, inode, size, _), (_, new_inode, new_size, _) = entry.identity, now
            if new_inode != inode:
                what = "it was replaced by another file"
            elif new_size != size:
                what = f"its size went from {size} to {new_size} bytes"
            else:
                what = "it was modified"
            raise SliceChanged(f"the file changed after its header was checked: {what}")
        yield handle


# Planes without a file allowed in the z extent however few the files: a run of slices starting anywhere in
# a scan (Scroll 1 has 14,376 slices, the largest scans some tens of thousands) keeps z = slice number.
EMPTY_PLANES_ALLOWED = 100_000


def check_z_extent(files: dict[int, Path], z0: int, z1: int) -> None:
    """Refuse a z range ``[z0, z1)`` that is mostly planes without a file: a stray, far-off slice number.

    The range is refused when its planes without a file outnumber both the
    files and :data:`EMPTY_PLANES_ALLOWED`.  Only the files' numbers are used
    (time and memory grow with the files, not with the range).

    Parameters
    ----------
    files : dict of int to Path
        The slice files inside the range, by number.

    Raises
    ------
    StackError
        Naming the outlying files, or the first slice when they all lie far
        from ``z0``, and the ``--ranges`` that converts the rest.
    """
    empty = (z1 - z0) - len(files)
    if empty <= max(len(files), EMPTY_PLANES_ALLOWED):
        return
    numbers = sorted(files)
    spread = (
        f"{len(files)} slice files would be spread over {z1 - z0} planes (z {z0} to {z1 - 1}), "
        f"{empty} of them without a file"
    )
    gaps = [(b - a, i) for i, (a, b) in enumerate(itertools.pairwise(numbers), start=1)]
    widest, cut = max(gaps, default=(0, 0))
    if numbers[0] - z0 >= widest:
        raise StackError(
            f"{spread}: the first slice is number {numbers[0]}; convert with --ranges ,,{numbers[0]}: "
            "(the store then starts at that slice and its metadata says so)"
        )
    before, after = numbers[:cut], numbers[cut:]
    outliers, kept = (after, before) if len(after) <= len(before) else (before, after)
    named = ", ".join(files[z].name for z in outliers[:5])
    more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
    raise StackError(
        f"{spread}; far from the others: {named}{more}; move it out of the input directory "
        f"or convert the others with --ranges ,,{kept[0]}:{kept[-1] + 1}"
    )


BAD_SLICE_POLICIES = ("error", "zero")
_LISTED = 10


def open_stack(files: dict[int, Path], bad_slices: str = "error") -> TiffStack:
    """Check the header of every slice file and gather them into a stack.

    Every file is checked before anything is written, and all problems are
    reported together: an unreadable header, a file shorter than its pixel
    data, a compression that cannot be decoded, a shape or type unlike the
    other slices'.

    Parameters
    ----------
    files : dict of int to Path
        Slice number to file, as from :func:`numbered_tiffs` (possibly a subset).
    bad_slices : {"error", "zero"}
        ``"zero"`` leaves bad slices out (they read as zeros) and lists them in
        :attr:`TiffStack.bad`, with a warning.

    Raises
    ------
    StackError
        Naming the files, if any slice is bad and ``bad_slices`` is ``"error"``,
        or if no slice is usable.
    """
    if not files:
        raise StackError("no slice files in the selected z range; check --ranges")
    found: dict[int, tuple[Path, tuple[int, int], np.dtype, SliceFile]] = {}
    problems: dict[int, str] = {}
    for z in sorted(files):
        try:
            found[z] = (files[z], *_inspect(z, files[z]))
        except StackError as error:
            problems[z] = str(error)
    if found:
        kinds = Counter((entry[1], entry[2]) for entry in found.values())
        (shape, dtype), _ = kinds.most_common(1)[0]
        reference = next(entry for entry in found.values() if (entry[1], entry[2]) == (shape, dtype))
        for z, (path, other_shape, other_dtype, *_) in list(found.items()):
            if (other_shape, other_dtype) != (shape, dtype):
                problems[z] = (
                    f"{path.name} is {other_shape[0]} x {other_shape[1]} {other_dtype}, but {reference[0].name} "
                    f"is {shape[0]} x {shape[1]} {dtype}; all slices must have one shape and type"
                )
                del found[z]
    if problems and (bad_slices == "error" or not found):
        listed = "; ".join(problems[z] for z in sorted(problems)[:_LISTED])
        more = f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        advice = "" if not found else "; or pass --bad_slices zero to write them as zeros"
        raise StackError(f"{len(problems)} slice(s) cannot be used: {listed}{more}{advice}")
    if problems:
        log.warning(
            "%d bad slice(s) will be written as zeros: %s",
            len(problems),
            "; ".join(problems[z] for z in sorted(problems)[:_LISTED]),
        )
    slices = {z: entry[3] for z, entry in found.items()}
    return TiffStack(slices, shape, dtype.newbyteorder("="), tuple(sorted(problems)))


def file_list(files: dict[int, Path], stack: TiffStack) -> list[tuple[str, int, int]]:
    """Name, size (bytes) and modification time (ns) of each file of ``files``, in slice order.

    The size and time are those of the header check; ``-1`` for a name that
    is not a readable file (a dangling link).
    """
    listed = []
    for z in sorted(files):
        entry = stack.slices.get(z)
        if entry is not None:
            size, mtime = entry.identity[2:]
        else:
            try:
                status = files[z].stat()
                size, mtime = status.st_size, status.st_mtime_ns
            except OSError:
                size = mtime = -1
        listed.append((files[z].name, size, mtime))
    return listed


def read_rows(stack: TiffStack, z: int, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray) -> None:
    """Read rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` of slice ``z`` into ``out``.

    Uncompressed contiguous TIFFs are read row range only, straight from the
    file; compressed strips are decoded only where they hold asked rows;
    anything else (tiles) is decoded whole and cut.  A slice number with no
    file reads as zeros.

    Parameters
    ----------
    out : numpy.ndarray, shape (rows[1] - rows[0], cols[1] - cols[0])

    Raises
    ------
    SliceReadError
        If the file cannot be read, naming it.
    """
    entry = stack.slices.get(z)
    if entry is None:
        out[...] = 0
        return
    try:
        if entry.data_offset is not None:
            _read_direct(stack, entry, rows, cols, out)
        elif entry.decode_rows < stack.shape[0]:
            _read_strips(entry, rows, cols, out)
        else:
            with _open_checked(entry) as handle:
                out[...] = tifffile.imread(handle, maxworkers=1)[rows[0] : rows[1], cols[0] : cols[1]]
    except Exception as error:
        message = f"{entry.path}: cannot read slice {z} ({error}); check or replace this slice"
        raise SliceReadError(message, isinstance(error, SliceChanged)) from None


def first_unreadable_row(stack: TiffStack, z: int) -> int:
    """The first row of slice ``z`` that cannot be read, found by reading the slice in order.

    The row is the first of the smallest piece that is read at once: the row
    itself in an uncompressed slice, its strip in a compressed one, row 0 in a
    slice that is decoded whole (tiles).  It belongs to the file, not to the
    rows that were being read when the failure showed, so a bad slice is
    zeroed from the same row whichever way the work is cut.

    Returns
    -------
    int
        A row of the slice, or its height if every row can be read now.

    Raises
    ------
    SliceReadError
        With ``changed`` set, if the file is not the one whose header was checked.
    """
    entry = stack.slices[z]
    height, width = stack.shape
    step = min(height, 1 if entry.data_offset is not None else entry.decode_rows)
    buffer = np.empty((step, width), stack.dtype)
    for top in range(0, height, step):
        bottom = min(top + step, height)
        try:
            read_rows(stack, z, (top, bottom), (0, width), buffer[: bottom - top])
        except SliceReadError as error:
            if error.changed:
                raise
            return top
    return height


def _read_direct(
    stack: TiffStack, entry: SliceFile, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray
) -> None:
    """Read the rows from the file straight into ``out`` (or a row buffer when columns are cut)."""
    assert entry.data_offset is not None
    (y0, y1), (x0, x1) = rows, cols
    width = stack.shape[1]
    full_width = x0 == 0 and x1 == width and out.flags.c_contiguous
    target = out if full_width else np.empty((y1 - y0, width), stack.dtype)
    with _open_checked(entry) as handle:
        handle.seek(entry.data_offset + y0 * width * stack.dtype.itemsize)
        got = handle.readinto(target.data.cast("B"))
    if got != target.nbytes:
        raise OSError(f"read {got} of {target.nbytes} bytes, the file is shorter than its header says")
    if entry.byteorder != _native_byteorder():
        target.byteswap(inplace=True)
    if not full_width:
        out[...] = target[:, x0:x1]


def _read_strips(entry: SliceFile, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray) -> None:
    """Decode the strips that hold rows ``rows`` and copy the asked part of each into ``out``."""
    (y0, y1), (x0, x1) = rows, cols
    step = entry.decode_rows
    with _open_checked(entry) as opened, tifffile.TiffFile(opened) as tif:
        page = tif.pages.first
        handle = tif.filehandle
        for index in range(y0 // step, (y1 - 1) // step + 1):
            handle.seek(page.dataoffsets[index])
            segment, _, shape = page.decode(handle.read(page.databytecounts[index]), index)
            strip = np.asarray(segment).reshape(shape[1], shape[2])
            top = index * step
            a, b = max(y0, top), min(y1, top + shape[1])
            out[a - y0 : b - y0] = strip[a - top : b - top, x0:x1]


def prefetch(stack: TiffStack, zs: range, rows: tuple[int, int], stripe: int | None = None) -> None:
    """Ask the operating system to read rows ``rows`` of slices ``zs`` into its cache.

    The reading is started (``posix_fadvise`` WILLNEED), not waited for, so that
    the files arrive while other work is done.  With ``stripe``, the rows are
    asked for ``stripe`` rows of every slice at a time, in the order a slab is
    read stripe by stripe; otherwise each slice's rows at once.  Compressed
    slices are asked for whole.  Where the hint is not supported it does nothing.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    row_bytes = stack.shape[1] * stack.dtype.itemsize
    opened: list[tuple[int, int | None]] = []
    try:
        for z in zs:
            entry = stack.slices.get(z)
            if entry is None:
                continue
            try:
                opened.append((os.open(entry.path, os.O_RDONLY), entry.data_offset))
            except OSError:
                continue  # reported when the slice is read
        step = stripe or rows[1] - rows[0]
        for first in range(rows[0], rows[1], step):
            last = min(first + step, rows[1])
            for descriptor, data_offset in opened:
                if data_offset is not None:
                    offset, length = data_offset + first * row_bytes, (last - first) * row_bytes
                    advise(descriptor, offset, length, os.POSIX_FADV_WILLNEED)
                elif first == rows[0]:
                    advise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)  # the whole file
    finally:
        for descriptor, _ in opened:
            os.close(descriptor)


class Lookahead:
    """Asks for the slabs of a band one slab ahead of the work, from a thread of its own.

    The first two slabs are asked for at once (:func:`prefetch`); every
    :meth:`advance` (the work has moved on to its next slab) allows one more,
    so the cache never holds more than the slab in work and the next.  Use as
    a context manager.
    """

    def __init__(self, stack: TiffStack, slabs: Sequence[range], rows: tuple[int, int], stripe: int | None) -> None:
        self._allowed = threading.Semaphore(2)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, args=(stack, slabs, rows, stripe), daemon=True)

    def _run(self, stack: TiffStack, slabs: Sequence[range], rows: tuple[int, int], stripe: int | None) -> None:
        for zs in slabs:
            self._allowed.acquire()
            if self._stopped:
                return
            prefetch(stack, zs, rows, stripe)

    def advance(self) -> None:
        """The work has moved on to its next slab: ask for the one after it."""
        self._allowed.release()

    def __enter__(self) -> Lookahead:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._stopped = True
        self._allowed.release()
        if kind is None:
            self._thread.join()


def _native_byteorder() -> str:
    return "<" if np.little_endian else ">"
