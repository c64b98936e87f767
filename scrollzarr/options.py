"""The options of a conversion, as the command line gives them."""

from __future__ import annotations

from dataclasses import dataclass

from scrollzarr import downsample as ds
from scrollzarr.errors import UsageError
from scrollzarr.tiffstack import BAD_SLICE_POLICIES
from scrollzarr.workers import available_cores


@dataclass(frozen=True)
class Options:
    """What the user asked for; the defaults are the command line's.

    Attributes
    ----------
    chunk_size : int
        Edge of the cubic chunks, voxels, the same at every level.
    nlevels : int
        Levels including full resolution.
    algorithm : {"mean", "gaussian", "nearest", "max"}
    ranges : str or None
        ``--ranges`` text, x,y,z order.
    max_gb : float or None
        Bound on the memory the conversion's buffers use, GiB.
    zarr_only : bool
        Write one plain array instead of the OME-Zarr hierarchy.
    overwrite : bool
    obytes : {0, 1}
        1 stores uint16 input as uint8 (``value // 256``).
    workers : int or None
        Worker threads; ``None`` for one per core.
    resume : bool
        Continue the stopped conversion in ``output``.
    bad_slices : {"error", "zero"}
        What an unreadable slice does: stop the run, or become zeros (recorded).
    quiet : bool
        No progress bar.
    """

    chunk_size: int = 128
    nlevels: int = 6
    algorithm: ds.Algorithm = "mean"
    ranges: str | None = None
    max_gb: float | None = None
    zarr_only: bool = False
    overwrite: bool = False
    obytes: int = 0
    workers: int | None = None
    resume: bool = False
    bad_slices: str = "error"
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise UsageError(f"--chunk_size must be at least 1, not {self.chunk_size}")
        if self.nlevels < 1:
            raise UsageError(f"--nlevels must be at least 1, not {self.nlevels}")
        if self.algorithm not in ds.ALGORITHMS:
            raise UsageError(f"--algorithm must be one of {', '.join(ds.ALGORITHMS)}, not {self.algorithm!r}")
        if self.obytes not in (0, 1):
            raise UsageError(f"--obytes must be 0 (same as input) or 1 (uint8), not {self.obytes}")
        if self.max_gb is not None and self.max_gb <= 0:
            raise UsageError(f"--max_gb must be a positive number of GB, not {self.max_gb}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be at least 1, not {self.workers}")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the output and --overwrite replaces it: give one of them")
        if self.bad_slices not in BAD_SLICE_POLICIES:
            raise UsageError(f"--bad_slices must be one of {', '.join(BAD_SLICE_POLICIES)}, not {self.bad_slices!r}")

    @property
    def worker_count(self) -> int:
        return self.workers or available_cores()
