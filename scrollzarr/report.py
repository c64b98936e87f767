"""What a run wrote, and its progress bar: for the user, not for the store."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from time import monotonic
from types import TracebackType
from typing import Protocol

import numpy as np
from tqdm import tqdm

from scrollzarr.blocks import Shape3
from scrollzarr.layout import StoreLayout
from scrollzarr.sizes import format_bytes
from scrollzarr.storage import Location, ObjectStore

log = logging.getLogger(__name__)

INTERVAL = 60.0  # seconds between two lines of ProgressLines


@dataclass
class LevelReport:
    """What was written for one level."""

    shape: Shape3
    chunks_total: int
    chunks_written: int = 0


@dataclass
class Report:
    """What a run wrote, for the final summary."""

    output: Location
    dtype: np.dtype
    layout: StoreLayout
    levels: dict[int, LevelReport] = field(default_factory=dict)
    missing: list[tuple[int, int]] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    seconds: float = 0.0
    plain: bool = False  # one array at the store's root (--zarr_only), not levels in a group

    def summary(self) -> str:
        written = sum(level.chunks_written for level in self.levels.values())
        raw = written * self.layout.chunk**3 * self.dtype.itemsize
        lines = [f"wrote {self.output}: {len(self.levels)} level(s), {self.dtype}, {self.layout.describe()}"]
        for index, level in sorted(self.levels.items()):
            z, y, x = level.shape
            lines.append(
                f"  level {index}: {z} x {y} x {x} (z, y, x), {level.chunks_written} of {level.chunks_total} "
                f"chunks written, {level.chunks_total - level.chunks_written} all-zero chunks skipped"
            )
        if self.layout.shard is None and self.layout.compressor == "none":  # every file one whole chunk
            files, nbytes = written, raw
        else:
            directories = [self.output] if self.plain else [self.output / str(level) for level in self.levels]
            files, nbytes = _files_and_bytes(directories)
        stored = f"{written} chunks in {files} files" if self.layout.shard else f"{written} chunk files"
        if self.layout.compressor != "none" and raw:
            stored += f", {format_bytes(nbytes)} ({nbytes / raw:.0%} of {format_bytes(raw)} uncompressed)"
        else:
            stored += f", {format_bytes(nbytes)}"
        lines.append(f"  {stored}, in {self.seconds:.1f} s")
        if self.missing:
            lines.append(f"  missing slices, written as zeros: {format_runs(self.missing)}")
        if self.bad:
            lines.append(f"  bad slices, written as zeros: {format_numbers(self.bad)}")
        return "\n".join(lines)


def _files_and_bytes(directories: list[Location]) -> tuple[int, int]:
    """Chunk (or shard) files of the level arrays in ``directories``, and their bytes (apparent sizes), found by
    walking the store: the count of a resumed run's earlier files is not kept anywhere else."""
    files = nbytes = 0
    for directory in directories:
        if isinstance(directory, ObjectStore):
            for key, size in directory.sizes().items():
                if all(part.isdigit() or part == "c" for part in key.split("/")):
                    files += 1
                    nbytes += size
            continue
        for path in directory.rglob("*"):
            parts = path.relative_to(directory).parts
            if path.is_file() and all(part.isdigit() or part == "c" for part in parts):
                files += 1
                nbytes += path.stat().st_size
    return files, nbytes


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


def progress_bar(shapes: Iterable[Shape3], quiet: bool) -> ProgressBar:
    """Progress over all the voxels of ``shapes``, with an ETA (see :func:`progress`)."""
    return progress(sum(s[0] * s[1] * s[2] for s in shapes), "vox", "converting", quiet)


class ProgressBar(Protocol):
    """What the tools call on their progress display: a tqdm bar, or :class:`ProgressLines`."""

    def update(self, n: float = 1) -> object: ...
    def set_description(self, desc: str) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def __enter__(self) -> ProgressBar: ...
    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None, /
    ) -> object: ...


def progress(total: float, unit: str, description: str, quiet: bool) -> ProgressBar:
    """The progress display of a run of ``total`` ``unit``: the same for the three tools.

    A tqdm bar where standard error is a terminal; elsewhere (a log file, a
    pipe) its carriage-return updates would fill the file, so one line a
    minute is logged instead (:class:`ProgressLines`).  Nothing with ``quiet``.
    Either may be updated from several threads (:class:`SharedProgress`).

    Parameters
    ----------
    total : float
        Units of work in the whole run (voxels, bytes, pixels).
    """
    if quiet:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        bar = tqdm(total=total, unit=unit, unit_scale=True, desc=description, mininterval=0.5, file=sys.stderr)
        return SharedProgress(bar)
    return SharedProgress(ProgressLines(total, description))


class SharedProgress:
    """A progress display that threads update at once: every call made under one lock.

    Worker threads report the work they finish (readback.py, the streamed
    levels); neither tqdm's ``update`` nor :meth:`ProgressLines.update` is safe
    from several threads (each reads and writes the count and the time of the
    last display without a lock), so two threads could log a line twice or
    lose one.
    """

    def __init__(self, bar: ProgressBar) -> None:
        self._bar = bar
        self._lock = threading.Lock()

    def update(self, n: float = 1) -> None:
        with self._lock:
            self._bar.update(n)

    def set_description(self, desc: str) -> None:
        with self._lock:
            self._bar.set_description(desc)

    def set_postfix_str(self, s: str) -> None:
        with self._lock:
            self._bar.set_postfix_str(s)

    def __enter__(self) -> SharedProgress:
        self._bar.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None, /
    ) -> None:
        self._bar.__exit__(kind, error, traceback)


class ProgressLines:
    """Progress logged as one line a minute (:data:`INTERVAL`): the fraction done, the time taken and the time left.

    Parameters
    ----------
    total : float
        Units of work in the whole run.
    description : str
        What is being done, at the start of each line.
    """

    def __init__(self, total: float, description: str) -> None:
        self.total = total
        self.description = description
        self.postfix = ""
        self.n = 0.0
        self.started = self.last = monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = monotonic()
        if now - self.last < INTERVAL:
            return
        self.last = now
        elapsed = now - self.started
        fraction = min(self.n / self.total, 1.0) if self.total else 1.0
        left = f", about {_duration(elapsed * (1 - fraction) / fraction)} left" if fraction > 0 else ""
        postfix = f"; {self.postfix}" if self.postfix else ""
        log.info(f"{self.description}: {100 * fraction:.1f} % done in {_duration(elapsed)}{left}{postfix}")

    def set_description(self, desc: str) -> None:
        self.description = desc

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _duration(seconds: float) -> str:
    """``3723.4`` -> ``"1:02:03"``."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
