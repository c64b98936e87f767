"""What a run wrote, and its progress bar: for the user, not for the store."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scrollzarr.blocks import Shape3
from scrollzarr.sizes import format_bytes


@dataclass
class LevelReport:
    """What was written for one level."""

    shape: Shape3
    chunks_total: int
    chunks_written: int = 0


@dataclass
class Report:
    """What a run wrote, for the final summary."""

    output: Path
    dtype: np.dtype
    chunk: int
    levels: dict[int, LevelReport] = field(default_factory=dict)
    missing: list[tuple[int, int]] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        written = sum(level.chunks_written for level in self.levels.values())
        nbytes = written * self.chunk**3 * self.dtype.itemsize
        lines = [f"wrote {self.output}: {len(self.levels)} level(s), {self.dtype}, chunks {self.chunk}^3"]
        for index, level in sorted(self.levels.items()):
            z, y, x = level.shape
            lines.append(
                f"  level {index}: {z} x {y} x {x} (z, y, x), {level.chunks_written} of {level.chunks_total} "
                f"chunks written, {level.chunks_total - level.chunks_written} all-zero chunks skipped"
            )
        lines.append(f"  {written} chunk files, {format_bytes(nbytes)}, in {self.seconds:.1f} s")
        if self.missing:
            lines.append(f"  missing slices, written as zeros: {format_runs(self.missing)}")
        if self.bad:
            lines.append(f"  bad slices, written as zeros: {format_numbers(self.bad)}")
        return "\n".join(lines)


def format_numbers(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    runs: list[str] = []
    start = previous = None
    for number in [*numbers, None]:
        if number is not None and previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = number
    return ", ".join(runs)


def format_runs(runs: list[tuple[int, int]]) -> str:
    """``[(1, 4), (7, 8)]`` (half-open runs) -> ``"1-3, 7"``."""
    return ", ".join(str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in runs)


def chunk_count(shape: Shape3, chunk: int) -> int:
    """Chunks of edge ``chunk`` that tile ``shape``."""
    count = 1
    for n in shape:
        count *= -(-n // chunk)
    return count


def progress_bar(shapes: Iterable[Shape3], quiet: bool) -> tqdm:
    """A bar over all the voxels of ``shapes``, with an ETA; none with ``quiet``."""
    total = sum(s[0] * s[1] * s[2] for s in shapes)
    return tqdm(total=total, unit="vox", unit_scale=True, disable=quiet, mininterval=1.0, desc="converting")
