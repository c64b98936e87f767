"""Find a directory's z-slice TIFFs, check their headers, and read rows of them.

A stack is a directory of single-image TIFFs whose names end in the slice
number (``00000.tif``, ``scan_0123.tiff``); the number is the z index.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from scrollzarr.errors import ScrollzarrError

log = logging.getLogger(__name__)

_NUMBERED_TIFF = re.compile(r"(\d+)\.tiff?$", re.IGNORECASE)
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
    """

    z: int
    path: Path
    data_offset: int | None


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
        Pixel type of every slice (native byte order).
    byteorder : str
        ``"<"`` or ``">"``, the files' byte order.
    """

    slices: dict[int, SliceFile]
    shape: tuple[int, int]
    dtype: np.dtype
    byteorder: str

    def missing(self, z0: int, z1: int) -> list[int]:
        """Slice numbers in ``[z0, z1)`` that have no file."""
        return [z for z in range(z0, z1) if z not in self.slices]

    @property
    def slice_bytes(self) -> int:
        """Bytes of one decoded slice."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


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
        match = _NUMBERED_TIFF.search(entry.name)
        if match is None or not entry.is_file():
            continue
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


def _inspect(path: Path) -> tuple[tuple[int, int], np.dtype, str, int | None]:
    """Read one TIFF's header: shape, dtype, byte order and, if directly readable, the data offset."""
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if len(page.shape) != 2 or page.samplesperpixel != 1:
                raise StackError(
                    f"{path}: holds an image of shape {page.shape}, not a single-channel 2D slice; "
                    "each z slice must be one grey-scale image"
                )
            end = max(int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=True))
            if end > size:
                raise StackError(
                    f"{path}: truncated, its pixel data should end at byte {end} but the file has "
                    f"{size} bytes; copy or download this slice again"
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
            offset = int(page.dataoffsets[0]) if direct else None
            return (int(page.shape[0]), int(page.shape[1])), np.dtype(page.dtype), tif.byteorder, offset
    except StackError:
        raise
    except Exception as error:  # tifffile raises many types for damaged files
        raise StackError(f"{path}: cannot read the TIFF header ({error}); check or replace this slice") from None


def open_stack(files: dict[int, Path]) -> TiffStack:
    """Check the header of every slice file and gather them into a stack.

    Parameters
    ----------
    files : dict of int to Path
        Slice number to file, as from :func:`numbered_tiffs` (possibly a subset).

    Raises
    ------
    StackError
        Naming the files, if slices differ in shape or dtype, a header is
        unreadable, or a file is shorter than its pixel data.
    """
    if not files:
        raise StackError("no slice files in the selected z range; check --ranges")
    slices: dict[int, SliceFile] = {}
    first: tuple[Path, tuple[int, int], np.dtype, str] | None = None
    for z in sorted(files):
        path = files[z]
        shape, dtype, byteorder, offset = _inspect(path)
        if first is None:
            first = (path, shape, dtype, byteorder)
        elif (shape, dtype) != first[1:3]:
            raise StackError(
                f"{path.name} is {shape[0]} x {shape[1]} {dtype}, but {first[0].name} is "
                f"{first[1][0]} x {first[1][1]} {first[2]}; all slices must have one shape and type"
            )
        slices[z] = SliceFile(z, path, offset)
    assert first is not None
    return TiffStack(slices, first[1], first[2].newbyteorder("="), first[3])


def read_rows(stack: TiffStack, z: int, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray) -> None:
    """Read rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]`` of slice ``z`` into ``out``.

    Uncompressed contiguous TIFFs are read row range only, straight from the
    file; other TIFFs are decoded whole and cut.  A slice number with no file
    reads as zeros.

    Parameters
    ----------
    out : numpy.ndarray, shape (rows[1] - rows[0], cols[1] - cols[0])

    Raises
    ------
    StackError
        If the file cannot be read, naming it.
    """
    entry = stack.slices.get(z)
    if entry is None:
        out[...] = 0
        return
    y0, y1 = rows
    x0, x1 = cols
    width = stack.shape[1]
    try:
        if entry.data_offset is None:
            image = tifffile.imread(entry.path)
            out[...] = image[y0:y1, x0:x1]
            return
        full_width = x0 == 0 and x1 == width and out.flags.c_contiguous
        target = out if full_width else np.empty((y1 - y0, width), stack.dtype)
        nbytes = target.nbytes
        with open(entry.path, "rb", buffering=0) as handle:
            handle.seek(entry.data_offset + y0 * width * stack.dtype.itemsize)
            got = handle.readinto(memoryview(target).cast("B"))
        if got != nbytes:
            raise OSError(f"read {got} of {nbytes} bytes, the file is shorter than its header says")
        if stack.byteorder != "=" and stack.byteorder != _native_byteorder():
            target.byteswap(inplace=True)
        if not full_width:
            out[...] = target[:, x0:x1]
    except Exception as error:
        raise StackError(f"{entry.path}: cannot read slice {z} ({error}); check or replace this slice") from None


def _native_byteorder() -> str:
    return "<" if np.little_endian else ">"
