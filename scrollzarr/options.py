"""The options of a conversion, as the command line gives them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scrollzarr import downsample as ds
from scrollzarr.errors import UsageError
from scrollzarr.layout import CLEVEL_RANGE, COMPRESSORS, ZARR_FORMATS, StoreLayout, ZarrFormat
from scrollzarr.tiffstack import BAD_SLICE_POLICIES
from scrollzarr.window import check_window
from scrollzarr.workers import available_cores

# Bounds past which a value is a typo, not a wish; each error says why.
MAX_CHUNK_SIZE = 1024  # a chunk is read, held and written whole: 1024^3 uint16 voxels are already 2 GiB
MAX_NLEVELS = 32  # 31 halvings take any axis of fewer than 2^31 voxels (every scan) to one voxel
MIN_MAX_GB = 2.0**-20  # 1 KiB: less is no bound for image data, but a bound in bytes or MB given as GB
MAX_MAX_GB = 2.0**20  # 1 PiB
MAX_WORKERS = 1024
MAX_SHARD_CHUNKS = 2**16  # a 1 MiB shard index; v3-sharded's shards hold 64 chunks


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
    zarr_format : {2, 3}
        2: OME-NGFF 0.4 on zarr 2 (the default); 3: OME-NGFF 0.5 on zarr 3.
    shard_shape : (int, int, int) or None
        Shards of the level arrays, voxels (z, y, x), multiples of ``chunk_size``; zarr 3 only.
    compressor : str
        One of :data:`scrollzarr.layout.COMPRESSORS`.
    clevel : int or None
        Compression level; ``None`` for the compressor's default.
    window : str or None
        ``--window`` as given: ``"LOW:HIGH"`` (uint16 values mapped to 0 and 255) or ``"auto"``;
        ``None`` for ``--obytes 1``'s ``value // 256``.
    preset : str or None
        The ``--preset`` whose settings these are (:data:`scrollzarr.presets.PRESETS`), for the plan.
    scheduler : str or None
        The Dask scheduler to run on (``--scheduler``): an address, a scheduler file or ``local:N``;
        ``None`` for this machine's threads.
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
    zarr_format: ZarrFormat = 2
    shard_shape: tuple[int, int, int] | None = None
    compressor: str = "none"
    clevel: int | None = None
    window: str | None = None
    preset: str | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise UsageError(f"--chunk_size must be at least 1, not {self.chunk_size}")
        if self.chunk_size > MAX_CHUNK_SIZE:
            raise UsageError(
                f"--chunk_size must be at most {MAX_CHUNK_SIZE}, not {self.chunk_size}: chunks are read, held in "
                f"memory and written whole, and {MAX_CHUNK_SIZE}^3 uint16 voxels are 2 GiB"
            )
        if self.nlevels < 1:
            raise UsageError(f"--nlevels must be at least 1, not {self.nlevels}")
        if self.nlevels > MAX_NLEVELS:
            raise UsageError(
                f"--nlevels must be at most {MAX_NLEVELS}, not {self.nlevels}: each level halves every axis, and "
                f"after {MAX_NLEVELS - 1} halvings any scan is a single voxel"
            )
        if self.algorithm not in ds.ALGORITHMS:
            raise UsageError(f"--algorithm must be one of {', '.join(ds.ALGORITHMS)}, not {self.algorithm!r}")
        if self.obytes not in (0, 1):
            raise UsageError(f"--obytes must be 0 (same as input) or 1 (uint8), not {self.obytes}")
        if self.max_gb is not None:
            check_max_gb(self.max_gb)
        if self.workers is not None:
            check_workers(self.workers)
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the output and --overwrite replaces it: give one of them")
        if self.bad_slices not in BAD_SLICE_POLICIES:
            raise UsageError(f"--bad_slices must be one of {', '.join(BAD_SLICE_POLICIES)}, not {self.bad_slices!r}")
        check_layout(self.zarr_format, self.chunk_size, self.shard_shape, self.compressor, self.clevel)
        check_window(self.window, self.obytes)

    @property
    def layout(self) -> StoreLayout:
        """The level arrays' layout these options ask for."""
        return StoreLayout(self.zarr_format, self.chunk_size, self.shard_shape, self.compressor, self.clevel)

    @property
    def worker_count(self) -> int:
        """Threads: of the run here, or of each task on a cluster (one unless ``--workers`` says more)."""
        if self.scheduler is not None:
            return self.workers or 1
        return self.workers or available_cores()


def check_max_gb(max_gb: float) -> None:
    """Refuse a ``--max_gb`` (GiB) that is not a number, not positive, or outside what a machine can have."""
    if not math.isfinite(max_gb):
        raise UsageError(f"--max_gb must be a finite number of GB, not {max_gb}")
    if max_gb <= 0:
        raise UsageError(f"--max_gb must be a positive number of GB, not {max_gb:g}")
    if max_gb < MIN_MAX_GB:
        raise UsageError(
            f"--max_gb must be at least {MIN_MAX_GB:.3g} (1 KiB), not {max_gb!r}; it is in GB (2^30 bytes)"
        )
    if max_gb > MAX_MAX_GB:
        raise UsageError(
            f"--max_gb must be at most {MAX_MAX_GB:.0f} (1 PiB, more than any machine's memory), not {max_gb:g}; "
            "leave it out for no bound"
        )


def check_workers(workers: int) -> None:
    """Refuse a ``--workers`` count below 1 or above :data:`MAX_WORKERS`."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    if workers > MAX_WORKERS:
        raise UsageError(
            f"--workers must be at most {MAX_WORKERS}, not {workers}: each worker holds its own buffers; "
            "leave it out for one per core"
        )


def check_layout(
    zarr_format: int, chunk_size: int, shard_shape: tuple[int, int, int] | None, compressor: str, clevel: int | None
) -> None:
    """Refuse a combination of ``--zarr_format``, ``--shard_shape``, ``--compressor`` and ``--clevel`` that
    cannot be written."""
    if zarr_format not in ZARR_FORMATS:
        raise UsageError(f"--zarr_format must be 2 or 3, not {zarr_format}")
    if compressor not in COMPRESSORS:
        raise UsageError(f"--compressor must be one of {', '.join(COMPRESSORS)}, not {compressor!r}")
    if shard_shape is not None:
        if zarr_format != 3:
            raise UsageError("--shard_shape needs --zarr_format 3: zarr format 2 has no shards")
        if len(shard_shape) != 3 or any(n < 1 for n in shard_shape):
            text = ",".join(map(str, shard_shape))
            raise UsageError(f"--shard_shape must be three positive numbers Z,Y,X, not {text}")
        if any(n % chunk_size for n in shard_shape):
            raise UsageError(
                f"--shard_shape {','.join(map(str, shard_shape))} must be whole chunks: each of Z,Y,X a multiple "
                f"of --chunk_size {chunk_size}"
            )
        count = math.prod(n // chunk_size for n in shard_shape)
        if count > MAX_SHARD_CHUNKS:
            raise UsageError(
                f"--shard_shape {','.join(map(str, shard_shape))} holds {count:,} chunks of {chunk_size}^3; at most "
                f"{MAX_SHARD_CHUNKS:,} per shard (every reader fetches a shard's whole index, 16 bytes a chunk, "
                "before any chunk of it): use smaller shards or larger chunks"
            )
    if clevel is not None:
        if compressor == "none":
            raise UsageError("--clevel sets the compression level: give it with --compressor")
        low, high = CLEVEL_RANGE[compressor]
        if not low <= clevel <= high:
            raise UsageError(f"--clevel for {compressor} must be from {low} to {high}, not {clevel}")
