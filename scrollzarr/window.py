"""``--window``: uint16 voxels to uint8 through a linear window, and the window ``auto`` finds in the input.

The mapping is exact integer arithmetic: for a window ``LOW:HIGH`` a uint16
value ``v`` becomes

    clip(floor((2 * 255 * (v - LOW) + (HIGH - LOW)) / (2 * (HIGH - LOW))), 0, 255)

that is ``255 * (v - LOW) / (HIGH - LOW)`` rounded to nearest with halves
rounded up, then clipped: ``LOW`` (and below) is 0, ``HIGH`` (and above) 255.

``--window auto`` takes ``LOW`` and ``HIGH`` from a fixed sample of the input
(:func:`sample_positions`): the non-zero voxels of up to :data:`SAMPLE_SLICES`
evenly spaced slices of the converted z range, in each of them up to
:data:`SAMPLE_ROWS` evenly spaced rows of the converted y range, every column
of the converted x range.  ``LOW`` is the floor of their 0.1 percentile and
``HIGH`` the ceiling of their 99.9 percentile (numpy's default, linear
interpolation), ``HIGH`` at least ``LOW + 1``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.tiffstack import SliceReadError, StackError, TiffStack, read_rows

log = logging.getLogger(__name__)

UINT16_MAX = 65535
SAMPLE_SLICES = 32
SAMPLE_ROWS = 64
PERCENTILES = (0.1, 99.9)
WINDOW_SOURCES = ("given", "auto")


@dataclass(frozen=True)
class Window:
    """A linear window from uint16 to uint8.

    Attributes
    ----------
    low, high : int
        uint16 values mapped to 0 and 255; ``0 <= low < high <= 65535``.
    source : {"given", "auto"}
        ``--window LOW:HIGH``, or found by ``--window auto``.
    """

    low: int
    high: int
    source: str = "given"

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= UINT16_MAX or self.source not in WINDOW_SOURCES:
            raise ValueError(f"not a window: {self}")

    @cached_property
    def table(self) -> np.ndarray:
        """The uint8 value of every uint16 value, shape (65536,).

        A table lookup is the fastest exact way measured: 5.9 ms for a 2048 x 2048
        uint16 plane, against 0.6 ms for ``--obytes 1``'s shift (downsample.to_uint8)
        and 24 ms for the int64 arithmetic of the module docstring (2 cores).
        """
        values = np.arange(UINT16_MAX + 1, dtype=np.int64) - self.low
        span = self.high - self.low
        return np.clip((2 * 255 * values + span) // (2 * span), 0, 255).astype(np.uint8)

    def apply(self, planes: np.ndarray, out: np.ndarray) -> None:
        """Map uint16 ``planes`` into the uint8 array ``out`` of the same shape."""
        out[...] = self.table[planes]

    def text(self) -> str:
        return f"{self.low}:{self.high}"


def parse_window(text: str) -> tuple[int, int] | None:
    """``--window`` text: ``(LOW, HIGH)`` for ``"LOW:HIGH"``, ``None`` for ``"auto"``.

    Raises
    ------
    UsageError
        If the text is neither, a value is not a uint16, or ``LOW >= HIGH``.
    """
    if text.strip().lower() == "auto":
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise UsageError(f"--window must be LOW:HIGH (whole uint16 values, e.g. 1000:40000) or auto, not {text!r}")
    low, high = (int(part) for part in parts)
    if high > UINT16_MAX:
        raise UsageError(f"--window {text}: values are uint16, from 0 to {UINT16_MAX}")
    if low >= high:
        raise UsageError(f"--window {text}: LOW must be below HIGH (LOW maps to 0, HIGH to 255)")
    return low, high


def check_window(text: str | None, obytes: int) -> None:
    """Refuse a ``--window`` that is malformed, or given without uint8 output."""
    if text is None:
        return
    parse_window(text)
    if obytes != 1:
        raise UsageError(
            "--window sets how uint16 becomes uint8: give it with --obytes 1 (or a --preset with uint8 output)"
        )


def evenly_spaced(start: int, stop: int, count: int) -> list[int]:
    """Up to ``count`` integers of ``[start, stop)``: the centre (rounded down) of each of ``count`` equal parts.

    All of them when the range holds ``count`` or fewer.
    """
    n = stop - start
    count = min(count, n)
    return [start + (2 * k + 1) * n // (2 * count) for k in range(count)]


def sample_positions(z_range: tuple[int, int], y_range: tuple[int, int]) -> tuple[list[int], list[int]]:
    """The slice numbers and rows (scan numbering) of ``--window auto``'s sample."""
    return evenly_spaced(*z_range, SAMPLE_SLICES), evenly_spaced(*y_range, SAMPLE_ROWS)


def window_of(values: np.ndarray) -> tuple[int, int]:
    """``(LOW, HIGH)`` of non-zero uint16 ``values`` (1-d, not empty): floor of the 0.1 percentile, ceiling of
    the 99.9 percentile, ``HIGH`` at least ``LOW + 1`` (``LOW`` lowered at the top of the range)."""
    low_value, high_value = np.percentile(values, PERCENTILES)
    low, high = math.floor(low_value), math.ceil(high_value)
    if high <= low:
        low, high = (low, low + 1) if low < UINT16_MAX else (UINT16_MAX - 1, UINT16_MAX)
    return low, high


def auto_window(
    stack: TiffStack, z_range: tuple[int, int], y_range: tuple[int, int], x_range: tuple[int, int], bad_slices: str
) -> Window:
    """``--window auto``: the window of the sample of :func:`sample_positions` within the crop.

    A slice without a file reads as zeros (none of its voxels counts); one that
    cannot be read stops the run, or with ``bad_slices == "zero"`` is left out.

    Raises
    ------
    ScrollzarrError
        If the sample holds no non-zero voxel, or (``bad_slices == "error"``) a slice cannot be read.
    """
    zs, rows = sample_positions(z_range, y_range)
    width = x_range[1] - x_range[0]
    found = []
    for z in zs:
        try:
            sample = _sample_rows(stack, z, rows, x_range, width)
            found.append(sample[sample != 0])
        except SliceReadError as error:
            if bad_slices == "error":
                raise StackError(f"{error}, or pass --bad_slices zero to leave it out") from None
            log.warning("%s; --window auto leaves it out of its sample", error)
    values = np.concatenate(found) if found else np.empty(0, np.uint16)
    where = f"{len(zs)} slice(s) x {len(rows)} row(s) x {width} column(s)"
    if values.size == 0:
        raise ScrollzarrError(
            f"--window auto found no non-zero voxel in its sample ({where}); give the window as --window LOW:HIGH"
        )
    low, high = window_of(values)
    log.info(
        "--window auto: %d:%d (the 0.1 and 99.9 percentiles of %d non-zero voxels in %s)",
        low, high, values.size, where,
    )  # fmt: skip
    return Window(low, high, "auto")


def _sample_rows(stack: TiffStack, z: int, rows: list[int], cols: tuple[int, int], width: int) -> np.ndarray:
    """Rows ``rows`` of slice ``z``, columns ``cols``, shape (len(rows), width)."""
    entry = stack.slices.get(z)
    if entry is not None and entry.data_offset is None and entry.decode_rows >= stack.shape[0]:
        # a slice decoded whole (tiles, one strip) is decoded once for all its rows, not once a row
        span = np.empty((rows[-1] + 1 - rows[0], width), stack.dtype)
        read_rows(stack, z, (rows[0], rows[-1] + 1), cols, span)
        return span[[row - rows[0] for row in rows]]
    out = np.empty((len(rows), width), stack.dtype)
    for index, row in enumerate(rows):
        read_rows(stack, z, (row, row + 1), cols, out[index : index + 1])
    return out


def resolve_window(
    text: str | None,
    stack: TiffStack,
    z_range: tuple[int, int],
    y_range: tuple[int, int],
    x_range: tuple[int, int],
    bad_slices: str,
) -> Window | None:
    """The window of ``--window`` ``text`` for ``stack`` cropped to the ranges (``auto``: its pre-pass).

    Raises
    ------
    ScrollzarrError
        If the slices are not uint16, or :func:`auto_window` finds no window.
    """
    if text is None:
        return None
    if stack.dtype != np.uint16:
        raise UsageError(f"--window maps uint16 values to uint8, but the slices are {stack.dtype}; leave it out")
    given = parse_window(text)
    return auto_window(stack, z_range, y_range, x_range, bad_slices) if given is None else Window(*given)
