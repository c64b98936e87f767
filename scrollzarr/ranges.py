"""Parse ``--ranges`` (Python slice syntax, x,y,z order) and resolve it against a volume.

The command line speaks x, y, z (TIFF column, TIFF row, slice number); arrays in
this package are indexed z, y, x.  :func:`parse_ranges` returns the ranges in
z, y, x order so that the conversion happens once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

from scrollzarr.errors import UsageError

AXES_XYZ = ("x", "y", "z")


@dataclass(frozen=True)
class AxisRange:
    """A half-open range ``start:stop`` along one axis; ``None`` means "from the start" / "to the end".

    Negative values count from the end of the axis, as in Python.
    """

    axis: str
    start: int | None = None
    stop: int | None = None

    def resolve(self, length: int) -> tuple[int, int]:
        """Clip the range to an axis of ``length`` voxels.

        Returns
        -------
        (start, stop) : tuple of int
            ``0 <= start < stop <= length``.

        Raises
        ------
        UsageError
            If the range starts past the data or selects nothing.
        """
        start, stop, _ = slice(self.start, self.stop).indices(length)
        if start >= length:
            raise UsageError(
                f"--ranges: {self.axis} starts at {self.start}, past the data "
                f"({self.axis} has {length} voxels, 0 to {length - 1}); choose a smaller start"
            )
        if stop <= start:
            raise UsageError(
                f"--ranges: {self.axis} range {self._text()} selects nothing "
                f"({self.axis} has {length} voxels); the stop must be greater than the start"
            )
        return start, stop

    def _text(self) -> str:
        start = "" if self.start is None else str(self.start)
        stop = "" if self.stop is None else str(self.stop)
        return f"{start}:{stop}"


def _parse_bound(text: str, axis: str, spec: str) -> int | None:
    text = text.strip()
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(
            f"--ranges: {axis} part {spec!r} is not of the form start:stop with whole numbers "
            "(for example 1000:2000, :500 or 200:)"
        ) from None


def _parse_axis(spec: str, axis: str) -> AxisRange:
    parts = spec.split(":")
    if spec.strip() == "":
        return AxisRange(axis)
    if len(parts) == 1:
        raise UsageError(
            f"--ranges: {axis} part {spec!r} is a single index; write a range such as "
            f"{spec.strip()}:{_plus_one(spec)} (start:stop)"
        )
    if len(parts) > 3:
        raise UsageError(f"--ranges: {axis} part {spec!r} has too many ':'; write start:stop")
    if len(parts) == 3:
        step = _parse_bound(parts[2], axis, spec)
        if step not in (None, 1):
            raise UsageError(f"--ranges: {axis} part {spec!r} has a step; only start:stop (step 1) is supported")
    return AxisRange(axis, _parse_bound(parts[0], axis, spec), _parse_bound(parts[1], axis, spec))


def _plus_one(spec: str) -> str:
    try:
        return str(int(spec) + 1)
    except ValueError:
        return "STOP"


def parse_ranges(text: str | None) -> tuple[AxisRange, AxisRange, AxisRange]:
    """Parse a ``--ranges`` value ``X,Y,Z`` into ranges in **z, y, x** order.

    Parameters
    ----------
    text : str or None
        Up to three comma-separated parts in x, y, z order, each ``start:stop``
        (either bound may be left out), empty for the whole axis.  Missing
        trailing parts mean the whole axis.  ``None`` or ``""`` selects everything.

    Returns
    -------
    (z, y, x) : tuple of AxisRange

    Raises
    ------
    UsageError
        For a step other than 1, a single index, more than three parts or
        anything that is not a whole number.

    Examples
    --------
    >>> z, y, x = parse_ranges("100:600,,")
    >>> (x.start, x.stop, y.start, z.stop)
    (100, 600, None, None)
    """
    specs = [] if text is None or text.strip() == "" else text.split(",")
    if len(specs) > 3:
        raise UsageError(
            f"--ranges {text!r} has {len(specs)} parts; give at most three, in x,y,z order "
            "(for example 1000:2000,1500:4000,2000:7000)"
        )
    specs += [""] * (3 - len(specs))
    x, y, z = (_parse_axis(spec, axis) for spec, axis in zip(specs, AXES_XYZ, strict=True))
    return z, y, x
