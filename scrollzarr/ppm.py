"""Reading volume-cartographer ``.ppm`` per-pixel maps.

A ``.ppm`` is a text header of ``key: value`` lines (``width``, ``height``,
``dim: 6``, ``ordered: true``, ``type: double``, ``version: 1``, in any order;
``#`` comments and unknown keys are ignored) ended by a line ``<>``, then
``height x width x 6`` little-endian float64, row-major: pixel (v, u) holds
(x, y, z, nx, ny, nz), a point of the scroll in full-resolution voxels
(x = TIFF column, y = TIFF row, z = slice number) and the surface normal
there.  A pixel whose normal is all zero is unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scrollzarr.errors import ScrollzarrError

END_OF_HEADER = b"<>"
MAX_HEADER_BYTES = 64 * 1024
VALUES_PER_PIXEL = 6
PIXEL_BYTES = VALUES_PER_PIXEL * 8
REQUIRED = {"width": None, "height": None, "dim": "6", "ordered": "true", "type": "double", "version": "1"}


class PpmError(ScrollzarrError):
    """A ``.ppm`` file that cannot be read as a per-pixel map."""


@dataclass(frozen=True)
class Ppm:
    """A checked per-pixel map, read a block of pixels at a time.

    The body is read with plain file reads, never memory-mapped: a mapped
    file's pages would count as the process's memory, and a segment's map
    can be larger than memory.

    Attributes
    ----------
    path : Path
    width, height : int
        Size of the map in pixels (u along the width, v along the height).
    offset : int
        Byte offset of the body in the file.
    """

    path: Path
    width: int
    height: int
    offset: int

    def rows(self, v0: int, v1: int, u0: int, u1: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions and normals of the pixels ``[v0:v1, u0:u1]``, in array axis order.

        Returns
        -------
        positions, normals : ndarray, shape (v1 - v0, u1 - u0, 3), float64
            (z, y, x) and (nz, ny, nx): the map's (x, y, z) reversed.
        """
        block = np.empty((v1 - v0, u1 - u0, VALUES_PER_PIXEL), dtype="<f8")
        with open(self.path, "rb", buffering=0) as file:
            for row, v in enumerate(range(v0, v1)):
                file.seek(self.offset + (v * self.width + u0) * PIXEL_BYTES)
                if file.readinto(memoryview(block[row]).cast("B")) != block[row].nbytes:
                    raise PpmError(f"{self.path} became shorter while it was read")
        block = block.astype(np.float64, copy=False)
        return block[..., 2::-1], block[..., :2:-1]


def parse_header(text: str, name: str) -> tuple[int, int]:
    """Check a header's fields and return ``(width, height)``.

    Raises
    ------
    PpmError
        Naming the first field that is missing or wrong.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PpmError(f"{name}: header line {line!r} is not 'key: value'; is this a .ppm per-pixel map?")
        fields[key.strip().lower()] = value.strip()
    for key, expected in REQUIRED.items():
        if key not in fields:
            raise PpmError(f"{name}: the header has no '{key}' field; a .ppm header needs {', '.join(REQUIRED)}")
        if expected is not None and fields[key].lower() != expected:
            raise PpmError(
                f"{name}: header field '{key}' is {fields[key]!r}; only '{key}: {expected}' maps can be read "
                "(6 float64 per pixel: x, y, z, nx, ny, nz)"
            )
    sizes = []
    for key in ("width", "height"):
        try:
            size = int(fields[key])
        except ValueError:
            size = 0
        if size <= 0:
            raise PpmError(f"{name}: header field '{key}' is {fields[key]!r}; it must be a positive whole number")
        sizes.append(size)
    return sizes[0], sizes[1]


def open_ppm(path: Path) -> Ppm:
    """Check a ``.ppm`` file's header and length; the body is read later, a block at a time.

    Raises
    ------
    PpmError
        If the file is missing or unreadable, its header is wrong, or its
        length is not that of ``width x height`` pixels of 48 bytes.
    """
    name = str(path)
    try:
        with open(path, "rb") as file:
            head = file.read(MAX_HEADER_BYTES)
            size = file.seek(0, 2)
    except OSError as error:
        raise PpmError(f"cannot read the .ppm {name}: {error.strerror or error}") from None
    ends = _header_end(head)
    if ends is None and len(head) == MAX_HEADER_BYTES and head.isascii():
        raise PpmError(
            f"{name}: the header is longer than 64 KiB (no '<>' line in its first {MAX_HEADER_BYTES} bytes); "
            "a .ppm header is a few lines: is this a .ppm per-pixel map?"
        )
    if ends is None:
        raise PpmError(f"{name}: no '<>' line ends the header; is this a .ppm per-pixel map?")
    text_end, end = ends
    try:
        text = head[:text_end].decode("ascii")
    except UnicodeDecodeError:
        raise PpmError(f"{name}: the header is not text; is this a .ppm per-pixel map?") from None
    width, height = parse_header(text, name)
    expected = width * height * PIXEL_BYTES
    if size - end != expected:
        raise PpmError(
            f"{name}: {size - end} bytes of pixel data where a {width} x {height} map has {expected} "
            f"({'truncated' if size - end < expected else 'extra data'}); the file is damaged or incomplete"
        )
    return Ppm(path, width, height, end)


def write_ppm(path: Path, data: np.ndarray) -> None:
    """Write a per-pixel map: ``data`` of shape (height, width, 6), (x, y, z, nx, ny, nz) per pixel."""
    height, width, values = data.shape
    if values != VALUES_PER_PIXEL:
        raise ValueError(f"a .ppm holds {VALUES_PER_PIXEL} values per pixel, not {values}")
    header = f"width: {width}\nheight: {height}\ndim: 6\nordered: true\ntype: double\nversion: 1\n<>\n"
    with open(path, "wb") as file:
        file.write(header.encode("ascii"))
        for v in range(0, height, 256):
            file.write(np.ascontiguousarray(data[v : v + 256], dtype="<f8").tobytes())


def _header_end(head: bytes) -> tuple[int, int] | None:
    """Offsets of the ``<>`` line and of the first byte after it, or ``None``."""
    start = 0
    while True:
        newline = head.find(b"\n", start)
        if newline < 0:
            return None
        if head[start:newline].strip() == END_OF_HEADER:
            return start, newline + 1
        start = newline + 1
