"""ppm_to_layers: a surface volume of layer TIFFs (and a stacked image) from a ``.ppm`` and a zarr volume.

The surface is cut into *bands* of rows, and each band is a task
(:class:`Band`): :func:`render_band` samples the band's tiles of
``block_size`` columns on the task's threads (left to right, then right to
left in the next band, so the chunks just read are the ones needed next) and
writes its rows into the pre-laid-out TIFFs, byte ranges no other band
touches. On this machine the bands are sampled one after the other, each
written (with direct I/O) while the next is sampled; on the workers of a Dask
cluster (``--scheduler``) the same two steps run as one task per band, which
writes into the same files on a shared file system: the files are the same,
byte for byte. A process keeps one chunk cache for all the bands it renders
of a run. Memory holds the chunk cache, two bands of output and, per
thread of each task running, the chunks of the piece of a tile it samples (the
cache may have let them go meanwhile) or, with the numpy kernel, a box of
voxels copied from them, whatever the size of the segment. The bands on the
disk are recorded as they finish, so that a render stopped half-way continues
from them (``--resume``), and a render may be cut into parts of consecutive
bands, rendered by separate runs and joined (``--num_parts``,
:mod:`scrollzarr.layermerge`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from scrollzarr import layermanifest as manifest
from scrollzarr import renderprogress
from scrollzarr.allocator import keep_freed_memory
from scrollzarr.chunkcache import CacheStats, ChunkCache, ChunkIndex
from scrollzarr.cluster import DaskExecutor, Executor, LocalExecutor
from scrollzarr.durable import fsync_directories, hidden_partial_path
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.fetching import FetchError
from scrollzarr.fetching import stop as stop_fetching
from scrollzarr.layertiff import ImageRows, LayerTiff
from scrollzarr.options import check_workers
from scrollzarr.outputlock import LOCK_NAME, OutputLock, holder
from scrollzarr.ppm import Ppm, open_ppm
from scrollzarr.remote import FETCHES, CachedStore, CacheSettings, FetchStats, cache_settings, is_url
from scrollzarr.report import progress
from scrollzarr.sampling import (
    DIRECTIONS,
    STACK_FILTERS,
    layer_offsets,
    mapped_pixels,
    sample_bounds,
    sample_layers,
    stack,
    stacked_layers,
)
from scrollzarr.sizes import GIB, format_bytes
from scrollzarr.store import ZARR_METADATA, chunk_nbytes
from scrollzarr.tifxyz import COORDINATES, MASK, META, Tifxyz, is_tifxyz, open_tifxyz
from scrollzarr.volume import NO_CACHE, Volume, open_volume
from scrollzarr.workers import Workers, available_cores, wait_out

log = logging.getLogger(__name__)

BAND_BYTES = 64 * 2**20  # one band of rows of every output image
MAX_BOX_VOXELS = 2**25  # voxels the numpy kernel's worker copies out of the chunks at a time
# Bytes of the chunks the compiled kernel's worker holds at a time: the chunks of one piece of a tile stay in
# memory while it samples them, even those the cache lets go meanwhile (as a box of voxels did before).
MAX_TABLE_BYTES = 2**28
DEFAULT_STACKED = 25
MAX_CACHE_GB = 2**20  # 1 PiB: more memory than any machine has
MAX_SPACING = 100_000  # voxels: wider than any scroll (scroll 1 is 14376 x 7888 x 8096)
MAX_BLOCK_SIZE = 2**16  # pixels: a band is at most BAND_BYTES anyway, a wider tile only takes more memory
# Files a run holds open besides its TIFFs: 9 measured with 2 workers (standard streams, the lock, zarr's event
# loop, the .ppm and chunk files being read), and each worker may have a chunk file and the .ppm open at once.
OTHER_FILES = 16
# Samples from which a render loads the compiled kernel: loading it costs about 0.55 s a process, which the
# kernel repays from about 33 M samples (the numpy kernel 39 M samples/s on two threads, the compiled one 114 on
# the benchmark's render);
# a quick look at a small segment keeps today's start-up (0.45 s for a whole run).
COMPILED_SAMPLES = 1 << 25
FILES_PER_WORKER = 2


@dataclass(frozen=True)
class LayerOptions:
    """The choices of a ``ppm_to_layers`` run (see the command's ``--help``)."""

    layers: int = 65
    stacked: int | None = None
    spacing: float = 1.0
    direction: str = "both"
    scale: float | None = None
    flip_normals: bool = False
    stack_filter: str = "max"
    workers: int | None = None
    cache_gb: float = 8.0
    block_size: int = 128
    level: int = 0
    overwrite: bool = False
    quiet: bool = False
    scheduler: str | None = None
    cache_dir: Path | None = None
    disk_cache_gb: float = 20.0
    resume: bool = False
    num_parts: int = 1
    part_id: int = 0

    @property
    def disk_cache(self) -> CacheSettings:
        """Where a remote volume's objects are kept: ``--cache_dir`` (default ``$XDG_CACHE_HOME/scrollzarr``, else
        ``~/.cache/scrollzarr``), at most ``--cache_gb``; nowhere with ``--cache_gb 0``."""
        return cache_settings(self.cache_dir, self.disk_cache_gb)

    @property
    def threads(self) -> int:
        """Threads: of the run here, or of each task on a cluster (one unless ``--workers`` says more)."""
        if self.scheduler is not None:
            return self.workers or 1
        return self.workers or available_cores()

    @property
    def stacked_count(self) -> int:
        """Layers the stacked image combines: as given, else 25 (or all layers, when there are fewer)."""
        return min(DEFAULT_STACKED, self.layers) if self.stacked is None else self.stacked

    def check(self) -> None:
        """Raise :class:`UsageError` for values no run can use."""
        if self.layers < 1:
            raise UsageError(f"--number_of_layers must be at least 1, not {self.layers}")
        if self.stacked is not None and not 1 <= self.stacked <= self.layers:
            raise UsageError(
                f"--number_of_stacked_layers must be between 1 and --number_of_layers ({self.layers}), "
                f"not {self.stacked}"
            )
        if not (np.isfinite(self.spacing) and self.spacing > 0):
            raise UsageError(f"--layer_spacing must be a positive number of voxels, not {self.spacing}")
        if self.spacing > MAX_SPACING:
            raise UsageError(
                f"--layer_spacing must be at most {MAX_SPACING} voxels (wider than any scroll), not {self.spacing}"
            )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise UsageError(f"--scale must be a positive number of output pixels per voxel, not {self.scale}")
        if self.direction not in DIRECTIONS:
            raise UsageError(f"--direction must be one of {', '.join(DIRECTIONS)}, not {self.direction}")
        if self.stack_filter not in STACK_FILTERS:
            raise UsageError(f"--stack_filter must be one of {', '.join(STACK_FILTERS)}, not {self.stack_filter}")
        if self.workers is not None:
            check_workers(self.workers)
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        workers = self.threads
        needed = self.layers + 1 + OTHER_FILES + FILES_PER_WORKER * workers
        if open_files != resource.RLIM_INFINITY and needed > open_files:
            raise UsageError(
                f"--number_of_layers {self.layers} with {workers} workers needs {needed} files open at once "
                f"(every layer TIFF stays open while it is written) and this process may open {open_files} "
                "(ulimit -n); raise that limit, or render fewer layers or with fewer workers"
            )
        if not (np.isfinite(self.cache_gb) and self.cache_gb > 0):
            raise UsageError(f"--zarr_cache_max_size_gb must be a positive number of GB, not {self.cache_gb}")
        if self.cache_gb > MAX_CACHE_GB:
            raise UsageError(
                f"--zarr_cache_max_size_gb must be at most {MAX_CACHE_GB} (1 PiB, more than any machine's memory), "
                f"not {self.cache_gb}"
            )
        cache_settings(self.cache_dir, self.disk_cache_gb)  # raises for a --cache_gb that is not a size
        if self.block_size < 1:
            raise UsageError(f"--block_size must be at least 1, not {self.block_size}")
        if self.block_size > MAX_BLOCK_SIZE:
            raise UsageError(
                f"--block_size must be at most {MAX_BLOCK_SIZE} pixels (rows go in bands of at most "
                f"{BAND_BYTES // 2**20} MiB; a wider tile only takes more memory), not {self.block_size}"
            )
        if self.level < 0:
            raise UsageError(f"--level must be 0 or more, not {self.level}")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues a stopped render, --overwrite starts again: give one of them")
        if self.num_parts < 1:
            raise UsageError(f"--num_parts must be at least 1, not {self.num_parts}")
        if not 0 <= self.part_id < self.num_parts:
            raise UsageError(
                f"--part_id must be between 0 and --num_parts - 1 ({self.num_parts - 1}), not {self.part_id}"
            )


@dataclass
class LayerReport:
    """What a run wrote, for the summary."""

    output_dir: Path
    stack_path: Path | None
    width: int
    height: int
    layers: int
    stacked: range
    stack_filter: str
    dtype: np.dtype
    level: int
    mapped: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    cache: CacheStats | None = None
    fetched: FetchStats | None = None
    part: str = ""  # which part of a render this run wrote, in words (--num_parts)
    resumed: int = 0  # bands a stopped render had written
    resumed_mapped: int = 0  # their pixels mapped

    @property
    def samples(self) -> int:
        """Samples this run took (not those of the bands a stopped render had written)."""
        return (self.mapped - self.resumed_mapped) * self.layers

    def summary(self) -> str:
        lines = [
            f"wrote {self.layers} layers of {self.width} x {self.height} ({self.dtype}) to {self.output_dir}"
            + (f" ({self.part})" if self.part else ""),
            f"  {self.mapped} of {self.width * self.height} pixels mapped; {self.samples / 1e6:.1f} M samples "
            f"of level {self.level} in {self.seconds:.1f} s ({self.samples / max(self.seconds, 1e-9) / 1e6:.1f} M/s)",
        ]
        if self.stack_path is not None:
            lines.append(
                f"  stacked image ({self.stack_filter} of layers {self.stacked.start}-{self.stacked.stop - 1}): "
                f"{self.stack_path}"
            )
        if self.cache is not None:
            lines.append(
                f"  volume: {self.cache.reads} chunk reads of {len(self.cache.distinct)} different chunks "
                f"({format_bytes(self.cache.nbytes_read)})"
            )
        if self.resumed:
            lines.append(f"  resumed: {self.resumed} band(s) of rows were on the disk already (not in the samples)")
        if self.fetched is not None:
            lines.append(
                f"  network: {self.fetched.fetched} chunk objects fetched ({format_bytes(self.fetched.nbytes)}), "
                f"{self.fetched.cached} read from the disk cache"
            )
        if self.nonfinite:
            lines.append(f"  {self.nonfinite} pixels with non-finite coordinates left unmapped (0)")
        return "\n".join(lines)


def layer_names(count: int) -> list[str]:
    """``00.tif`` … for ``count`` layers, zero-padded to at least two digits."""
    digits = max(2, len(str(count - 1)))
    return [f"{k:0{digits}d}.tif" for k in range(count)]


def ppm_to_layers(
    ppm_path: Path, zarr_path: Path | str, output_dir: Path, stack_path: Path | None, options: LayerOptions
) -> LayerReport:
    """Render the layer TIFFs (and the stacked image, if ``stack_path``) of a surface.

    The output directory is locked for the whole run (and the stacked image on its own).  The run records its
    partial files before it creates them and again, with their sizes, before
    it renders, their final names before the first rename, and its layer
    TIFFs once they have their final names (see :mod:`scrollzarr.layermanifest`);
    every TIFF is flushed before any gets its final name, and the directories
    after the renames.  With ``--overwrite``, files that an earlier run recorded and this run does
    not write again are removed.  With ``options.scheduler`` the bands are
    rendered on that Dask cluster, whose workers must see the inputs and the
    outputs at the same paths; each task makes its rows durable before it
    reports, and this process renames the files once every band is written.

    The bands on the disk are recorded as they finish (:mod:`scrollzarr.renderprogress`): a run killed or
    interrupted keeps its partial files, and ``options.resume`` renders only the bands missing.  With
    ``options.num_parts`` the run renders part ``options.part_id`` of the bands alone, into files, a lock and
    records of the part's own (:class:`RenderPart`; :mod:`scrollzarr.layermerge` joins the parts).

    Raises
    ------
    ScrollzarrError
        For bad options, a bad ``.ppm`` or volume, outputs that collide with
        the inputs or each other, another run writing the same directory,
        outputs that would replace files without ``--overwrite``, a cluster
        that cannot be used or whose workers cannot read the inputs or write
        the outputs, or a band that failed for good.  Nothing under a final
        name is written unless the whole run succeeds.
    """
    options.check()
    keep_freed_memory()
    ppm = open_surface(ppm_path, options)
    volume = open_volume(zarr_path, options.level, options.disk_cache)
    dtype = volume.array.dtype
    part = render_part(ppm, options, dtype)
    names = [part.name(name) for name in layer_names(options.layers)]
    stack_path = None if stack_path is None else part.file(stack_path)
    _check_paths(ppm_path, zarr_path, output_dir, stack_path, names, part)
    if output_dir.exists() and not output_dir.is_dir():
        raise ScrollzarrError(f"{output_dir} is a file; OUTPUT_TIFF_DIR must be a directory for the layer TIFFs")
    record_name, lock_name = part.name(manifest.MANIFEST_NAME), part.name(LOCK_NAME)
    with _executor(options) as executor, ExitStack() as locks:
        what = "output directory" if not part.suffix else f"output directory (part {part.number} of its render)"
        held = [locks.enter_context(OutputLock(output_dir, what, lock_name))]
        if stack_path is not None:
            # The stacked image may lie outside the directory: held on its own, so that two runs writing it
            # (with other layer directories) never share its partial file (measured: one exited 0 with a mix).
            stack_lock = OutputLock(stack_path.parent, "stacked image", stack_lock_name(stack_path), stack_path)
            held.append(locks.enter_context(stack_lock))
        created = [directory for lock in held for directory in lock.created]
        run = uuid.uuid4().hex
        if options.scheduler is not None:
            # Before any partial file is made: a band checks the lock's mark after it opens a file (see _write_band).
            for lock in held:
                lock.mark(run)
        fingerprint = fingerprint_of(ppm, volume, zarr_path, stack_path, options, dtype, part)
        progress_name = part.name(renderprogress.NAME)
        resumed = renderprogress.resume(output_dir, fingerprint, progress_name) if options.resume else None
        if resumed is None:
            _check_outputs(output_dir, stack_path, options.overwrite, names, part)
            check_space(output_dir, stack_path, part.height * ppm.width * dtype.itemsize, options.layers)
        surface_file = ppm_path / COORDINATES[0] if isinstance(ppm, Tifxyz) else ppm_path
        readable = [surface_file] + [path for path, _ in volume.metadata[:1]]
        writable = [output_dir] if stack_path is None else [output_dir, stack_path.parent]
        for path in readable:
            for directory in writable:
                executor.check_paths(path.absolute(), directory.absolute())
        manifest.remove_leftovers(output_dir, [record_name, progress_name])
        overwrite = options.overwrite if resumed is None else resumed.overwrite
        previous = manifest.read_manifest(output_dir, record_name) if overwrite else None
        report = LayerReport(
            output_dir,
            stack_path,
            ppm.width,
            part.height,
            options.layers,
            stacked_layers(options.layers, options.stacked_count, options.direction),
            options.stack_filter,
            dtype,
            options.level,
        )
        if part.suffix:
            report.part = (
                f"part {part.number} of {part.count}: surface rows {part.rows[0]}:{part.rows[1]}; once every part "
                "is rendered, join them with --merge_parts"
            )
        start = time.perf_counter()
        files: list[LayerTiff] = []
        partial_names = [hidden_partial_path(output_dir / name).name for name in names]
        # the record a failed run puts back: a resumed render's lists the stopped render's partial files
        restored = manifest.read_manifest(output_dir, record_name) if resumed is not None else previous
        progress_record = resumed
        try:
            finals = [output_dir / name for name in names] + ([] if stack_path is None else [stack_path])
            if resumed is None:
                creating = manifest.add_pending(output_dir, previous, dict.fromkeys(partial_names), record_name)
                for final in finals:
                    files.append(LayerTiff(final, part.height, ppm.width, dtype))
                laid_out = {name: name for name in partial_names}
                pending = manifest.add_pending(output_dir, creating, laid_out, record_name)
                record = progress_record = renderprogress.RenderProgress(
                    output_dir, fingerprint, overwrite, name=progress_name
                )
                record.save()
            else:
                record = resumed
                for final in finals:
                    files.append(LayerTiff(final, part.height, ppm.width, dtype, existing=True))
                pending = restored or manifest.Record()
                log.info("resuming: %d band(s) of the stopped render are on the disk", len(resumed.done))
            holders = [held[0]] * options.layers + held[1:]  # the lock that holds each file: the stack's its own
            job = RenderJob(
                run=run,
                surface=replace(ppm, path=ppm.path.absolute()),
                flip_normals=options.flip_normals,
                compiled=ppm.width * ppm.height * options.layers >= COMPILED_SAMPLES,
                zarr=zarr_path if isinstance(zarr_path, str) else zarr_path.absolute(),
                cache=options.disk_cache,
                level=options.level,
                layers=options.layers,
                spacing=options.spacing,
                direction=options.direction,
                stacked=report.stacked,
                stack_filter=options.stack_filter,
                block_size=options.block_size,
                cache_bytes=int(options.cache_gb * GIB),
                threads=executor.threads,
                images=tuple(file.rows(lock.path) for file, lock in zip(files, holders, strict=True)),
                stacked_image=stack_path is not None,
                remote=options.scheduler is not None,
                first_row=part.rows[0],
            )
            _render(executor, job, report, options.quiet, record, files, part.bands)
            here = _samplers.get(job)
            if here is not None and isinstance(here.volume.array.store, CachedStore):  # a run on this machine
                report.fetched = here.volume.array.store.stats
            changed = volume.changed()
            if changed:  # chunks read meanwhile may have been missing (zeros) or another volume's
                raise ScrollzarrError(
                    f"the volume {zarr_path} changed while it was read ({changed}); nothing was written: "
                    "render again once the run writing it has finished"
                )
            for file in files:
                file.flush()
            # The final names too, before the first rename: a run stopped during the renames or after them
            # leaves a record of every file it wrote, and a failed one keeps it.
            finals_named = dict(zip(names, partial_names, strict=True))
            restored = manifest.add_pending(output_dir, pending, finals_named, record_name)
            record.remove()
            progress_record = None
            for file in files:
                file.commit()
        except BaseException as error:
            # Kept for --resume: the bands of a render interrupted (Ctrl-C, SIGTERM: a batch system's time limit) or
            # cut off from its volume's server, and a resumed render's whatever stopped it (they are the stopped
            # render's too: a damaged or missing partial file must not cost the others).
            kept = isinstance(error, KeyboardInterrupt | FetchError) or resumed is not None
            if kept and progress_record is not None:
                _keep_for_resume(files, progress_record)
                if isinstance(error, FetchError):
                    raise FetchError(
                        f"{error}; the bands rendered so far are kept: to continue, run the same command with --resume"
                    ) from None
                if isinstance(error, ScrollzarrError):
                    raise type(error)(f"{error} (the stopped render's files are kept)") from None
                raise
            for file in files:
                file.discard()
            manifest.restore(output_dir, restored, record_name)
            if progress_record is not None:
                progress_record.remove()
            raise
        removed = manifest.remove_stale(output_dir, previous, set(names) | set(partial_names))
        if removed:
            log.info(f"removed {len(removed)} file(s) of earlier runs from {output_dir}")
        manifest.write_finished(
            output_dir, names, part.height, ppm.width, dtype, record_name, fingerprint if part.suffix else None
        )
        # The directories written in, and the parents of those this run created (else a power cut can lose a
        # new directory's entry, and the files in it with it).
        written = [output_dir] if stack_path is None else [output_dir, stack_path.parent]
        fsync_directories([*written, *(directory.parent for directory in created)])
        report.seconds = time.perf_counter() - start  # not the cluster's shutdown (a LocalCluster's: about 1 s)
    return report


def _save_record(
    files: list[LayerTiff], record: renderprogress.RenderProgress, done: dict[int, tuple[int, int]]
) -> None:
    """Flush ``files`` and save ``record`` listing the bands ``done``, which are written."""
    for file in files:
        file.sync()
    record.save(done)


def _keep_for_resume(files: list[LayerTiff], progress_record: renderprogress.RenderProgress) -> None:
    """Keep a stopped render's partial files, and the bands on the disk, for ``--resume``."""
    _save_record(files, progress_record, progress_record.done)
    for file in files:
        file.close()


def fingerprint_of(
    surface: Ppm | Tifxyz,
    volume: Volume,
    zarr_path: Path | str,
    stack_path: Path | None,
    options: LayerOptions,
    dtype: np.dtype,
    part: RenderPart,
) -> dict[str, Any]:
    """What a render is, for ``--resume`` to tell a stopped render of the same thing (JSON values)."""
    path = surface.path
    files = [path / name for name in (*COORDINATES, MASK)] if isinstance(surface, Tifxyz) else [path]
    statuses = {file.name: file.stat() for file in files if file.exists()}
    identities = {name: [status.st_size, status.st_mtime_ns] for name, status in statuses.items()}
    value = {
        "surface": str(path.absolute()),
        "surface files (size, time)": identities,
        "volume": zarr_path if isinstance(zarr_path, str) else str(zarr_path.absolute()),
        # absolute, and not the device number: a part rendered on another machine (NFS) or from another folder
        "volume metadata (time)": [
            [str(Path(file).absolute()), None if identity is None else identity[2]]
            for file, identity in volume.metadata
        ],
        "level": options.level,
        "layers": options.layers,
        "spacing": options.spacing,
        "direction": options.direction,
        "stacked layers": options.stacked_count,
        "stack filter": options.stack_filter,
        "flip normals": options.flip_normals,
        "scale": options.scale,
        "block size": options.block_size,
        "image": [surface.height, surface.width, str(dtype)],
        "stacked image": None if stack_path is None else str(stack_path.absolute()),
        "part (number, count)": [part.number, part.count],
    }
    return json.loads(json.dumps(value))  # compared with the record as JSON gives it back (lists, not tuples)


def open_surface(path: Path, options: LayerOptions) -> Ppm | Tifxyz:
    """The surface at ``path``: a tifxyz folder (rendered at ``--scale``, 1 output pixel per voxel by default)
    or a ``.ppm`` file (whose pixels are its own: ``--scale`` is refused).

    Raises
    ------
    ScrollzarrError
    """
    if is_tifxyz(path):
        return open_tifxyz(path, 1.0 if options.scale is None else options.scale)
    if options.scale is not None:
        raise UsageError(f"--scale is for tifxyz surfaces; the .ppm {path} has its pixels already (leave --scale out)")
    return open_ppm(path)


@contextmanager
def _executor(options: LayerOptions) -> Iterator[Executor]:
    """What runs the bands: the Dask cluster of ``--scheduler``, connected, or this machine's threads (dask is then
    not imported)."""
    if options.scheduler is None:
        yield LocalExecutor(options.threads)
        return
    then = "render again (nothing was written under a final name)"
    with DaskExecutor(options.scheduler, options.threads, then) as executor:
        yield executor


def _render(
    executor: Executor,
    job: RenderJob,
    report: LayerReport,
    quiet: bool,
    record: renderprogress.RenderProgress,
    files: list[LayerTiff],
    every: list[Band],
) -> None:
    """Render the bands ``every`` of ``job`` on ``executor`` but those ``record`` lists as done, adding what each
    found to ``report``, and record the bands done (at most once a second, after flushing ``files``)."""
    ppm = job.surface
    rows = every[0].rows[1] - every[0].rows[0]
    bands = [band for band in every if band.number not in record.done]
    report.resumed = len(record.done)
    for mapped, nonfinite in record.done.values():
        report.mapped += mapped
        report.resumed_mapped += mapped
        report.nonfinite += nonfinite
    report.cache = stats = CacheStats()
    seconds = []
    flushing: Future[None] | None = None
    # The record is saved on a thread of its own: the flushes before it waited for the disk while no band was
    # sampled (0.9 s of a quarter of the benchmark's 11 s, one worker).  It lists the bands written before the
    # flush began; the thread is done before the caller closes the files or saves the record itself.
    flusher = ThreadPoolExecutor(1, "scrollzarr-flush")
    try:
        with progress(ppm.width * sum(band.rows[1] - band.rows[0] for band in every), "px", "rendering", quiet) as bar:
            bar.update(sum(band.rows[1] - band.rows[0] for band in every if band.number in record.done) * ppm.width)
            for band, result in _render_bands(executor, job, bands):
                report.mapped += result.mapped
                report.nonfinite += result.nonfinite
                stats.reads += result.cache.reads
                stats.distinct |= result.cache.distinct
                stats.nbytes_read += result.cache.nbytes_read
                seconds.append(result.seconds)
                bar.update(result.pixels)
                record.done[band.number] = (result.mapped, result.nonfinite)
                if record.due() and (flushing is None or flushing.done()):
                    if flushing is not None:
                        flushing.result()  # raises what stopped it
                    flushing = flusher.submit(_save_record, files, record, dict(record.done))
    finally:
        if flushing is not None:
            wait_out(flushing)
        flusher.shutdown(wait=False)  # (its one thread has nothing left to do)
    if flushing is not None:
        flushing.result()
    if seconds:
        log.log(
            logging.INFO if job.remote else logging.DEBUG,
            "%d band(s) of %d rows rendered, %.3f s each on average (%.3f s the longest)",
            len(bands), rows, sum(seconds) / len(seconds), max(seconds),
        )  # fmt: skip
    if not report.mapped:
        log.warning(
            "no pixel of the surface %s is mapped: every layer is 0 (a .ppm with no non-zero normal, or a tifxyz "
            "grid without a valid point whose four neighbours are valid)",
            ppm.path,
        )


@dataclass(frozen=True)
class RenderPart:
    """The rows of a render one run writes: all of them, or part ``number`` of ``count`` (``--num_parts``).

    Attributes
    ----------
    number, count : int
    bands : list of Band
        The part's bands, numbered as in the whole render.
    """

    number: int
    count: int
    bands: list[Band]

    @property
    def rows(self) -> tuple[int, int]:
        """``[v0, v1)``: the surface rows of the part."""
        return self.bands[0].rows[0], self.bands[-1].rows[1]

    @property
    def height(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def suffix(self) -> str:
        """What the part's file names carry: ``.part3``, nothing for a whole render."""
        return f".part{self.number}" if self.count > 1 else ""

    def name(self, name: str) -> str:
        """``name`` of the part (:func:`scrollzarr.renderprogress.part_name`)."""
        return renderprogress.part_name(name, self.number, self.count)

    def file(self, path: Path) -> Path:
        """``path`` of the part (the stacked image: ``stack.tif`` -> ``stack.part3.tif``)."""
        return path.with_name(self.name(path.name))


def bands_of(surface: Ppm | Tifxyz, layers: int, dtype: np.dtype, block_size: int) -> list[Band]:
    """The bands of rows of a render: as many rows as ``block_size``, fewer when one row of every image (the
    layers and the stacked image) is more than :data:`BAND_BYTES` / ``block_size``."""
    row_bytes = surface.width * (layers + 1) * np.dtype(dtype).itemsize
    rows = max(1, min(block_size, BAND_BYTES // row_bytes))
    starts = range(0, surface.height, rows)
    return [Band(number, (v0, min(surface.height, v0 + rows))) for number, v0 in enumerate(starts)]


def render_part(surface: Ppm | Tifxyz, options: LayerOptions, dtype: np.dtype) -> RenderPart:
    """The part of the render that ``--num_parts`` and ``--part_id`` ask for: the bands of the whole render cut
    into ``num_parts`` runs of consecutive bands, as even as whole bands allow.

    Raises
    ------
    UsageError
        If there are fewer bands than parts.
    """
    bands = bands_of(surface, options.layers, dtype, options.block_size)
    count = options.num_parts
    if count > len(bands):
        raise UsageError(
            f"--num_parts {count} is more than the render's {len(bands)} band(s) of rows; give at most {len(bands)}"
        )
    number = options.part_id
    return RenderPart(number, count, bands[number * len(bands) // count : (number + 1) * len(bands) // count])


@dataclass(frozen=True)
class Band:
    """A task of a render: surface rows ``rows``, every column, written into every image by this task alone.

    Attributes
    ----------
    number : int
        Its place from the top; odd bands visit their tiles right to left.
    rows : (int, int)
        ``[v0, v1)``, rows of the surface (and of every image).
    """

    number: int
    rows: tuple[int, int]

    def describe(self) -> str:
        """The band in words, for messages."""
        return f"surface rows {self.rows[0]}:{self.rows[1]}"


@dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: each process keeps its cache per job
class RenderJob:
    """What every band of a render needs, as plain values that cross a process boundary.

    Attributes
    ----------
    run : str
        The render's identifier, which the output directory's record names while it runs.
    surface : Ppm or Tifxyz
        The surface (its path absolute).
    zarr : Path or str
        The volume (absolute), or its URL; each process opens it once per job.
    level, layers, spacing, direction, stacked, stack_filter, block_size
        As :class:`LayerOptions` gives them (``stacked``: the layers the stacked image combines).
    cache_bytes : int
        Bound on each process's chunk cache, shared by the bands it renders.
    threads : int
        Threads each band samples its tiles with.
    images : tuple of ImageRows
        Where to write: the layers in order, then the stacked image if there is one.
    stacked_image : bool
        Whether the last of ``images`` is the stacked image.
    flip_normals : bool
        Sample along the surface's normals turned round (``--flip_normals``).
    cache : CacheSettings
        Where a remote volume's objects are kept on disk (none for a volume on disk).
    first_row : int
        The surface row that is row 0 of the images (a part of a render, ``--num_parts``, writes its rows alone).
    compiled : bool
        Sample with the compiled kernel (:mod:`scrollzarr.kernel`), for renders of at least
        :data:`COMPILED_SAMPLES`.
    remote : bool
        Bands run on a cluster: each makes its rows durable before it reports, and writes into a file only while
        the lock that holds it bears the run's mark (a band of a stopped render may still be running).
    """

    run: str
    surface: Ppm | Tifxyz
    zarr: Path | str
    level: int
    layers: int
    spacing: float
    direction: str
    stacked: range
    stack_filter: str
    block_size: int
    cache_bytes: int
    threads: int
    images: tuple[ImageRows, ...]
    stacked_image: bool
    flip_normals: bool
    remote: bool
    compiled: bool = False
    cache: CacheSettings = NO_CACHE
    first_row: int = 0


@dataclass
class BandResult:
    """What a band found: pixels mapped, pixels with non-finite coordinates, pixels rendered, the chunks its
    threads read, and the seconds it took."""

    mapped: int
    nonfinite: int
    pixels: int
    cache: CacheStats = field(default_factory=CacheStats)
    seconds: float = 0.0


class StaleRender(ScrollzarrError):
    """A band of a render that has stopped: its files now belong to another render, or to none."""


def render_band(job: RenderJob, band: Band) -> BandResult:
    """Sample ``band`` of the surface and write its rows into every image of ``job`` (:func:`sample_band`, then
    :func:`write_band`).

    Safe to run twice, even at once: it writes the same bytes to the same
    places, which no other band writes.

    Raises
    ------
    StaleRender
        On a cluster, if the lock of an image no longer bears the job's run's
        mark (nothing is written into that image then).
    """
    return write_band(job, sample_band(job, band), job.threads, direct=False)


@dataclass
class SampledBand:
    """A band sampled and not yet written: its rows of every image (the layers, then the stacked image if any)."""

    band: Band
    images: list[np.ndarray]
    result: BandResult


def sample_band(job: RenderJob, band: Band) -> SampledBand:
    """Sample ``band``'s tiles on ``job.threads`` threads into its rows of every image."""
    started = time.monotonic()
    sampler = _sampler(job)
    (v0, v1), width, block = band.rows, job.surface.width, job.block_size
    layers = np.zeros((job.layers, v1 - v0, width), sampler.dtype)
    stacked = np.zeros((v1 - v0, width), sampler.dtype) if job.stacked_image else None
    starts = list(range(0, width, block))
    if band.number % 2:
        starts.reverse()
    stats = CacheStats()
    spans = [((v0, v1), (u0, min(width, u0 + block))) for u0 in starts]
    prefetch = Prefetch(sampler, job, spans, stats) if sampler.remote else None

    def tile(number: int) -> tuple[int, int]:
        if prefetch is not None:
            prefetch.begin(number)
        u0 = spans[number][1][0]
        return sampler.tile(
            job, stats, *spans[number], layers[:, :, u0 : u0 + block],
            None if stacked is None else stacked[:, u0 : u0 + block],
        )  # fmt: skip

    try:
        with Workers(job.threads) as pool:
            try:
                counts = pool.run([partial(tile, number) for number in range(len(spans))])
            except KeyboardInterrupt:
                stop_fetching()  # the tiles still running give up the requests they wait to retry
                raise
    finally:
        if prefetch is not None:
            prefetch.stop()
    mapped = sum(count for count, _ in counts)
    nonfinite = sum(count for _, count in counts)
    result = BandResult(mapped, nonfinite, (v1 - v0) * width, stats, time.monotonic() - started)
    return SampledBand(band, [*layers] if stacked is None else [*layers, stacked], result)


def write_band(job: RenderJob, sampled: SampledBand, threads: int, direct: bool) -> BandResult:
    """Write a sampled band's rows into every image of ``job``, on ``threads`` threads, with direct I/O if
    ``direct`` (only where no other band writes at the same time: :class:`~scrollzarr.layertiff.RowFile`); what it
    found."""
    started = time.monotonic()
    first = sampled.band.rows[0] - job.first_row
    with Workers(threads) as pool:
        pool.run(
            [
                partial(_write_rows, job, target, first, rows, direct)
                for target, rows in zip(job.images, sampled.images, strict=True)
            ]
        )
    sampled.result.seconds += time.monotonic() - started
    return sampled.result


def _render_bands(executor: Executor, job: RenderJob, bands: list[Band]) -> Iterator[tuple[Band, BandResult]]:
    """Render ``bands`` on ``executor``, yielding each once its rows are written.

    On this machine, a band's rows are written while the next band is sampled: with direct I/O (:class:`RowFile`)
    the writes mostly wait for the disk, and the sampling threads stood idle meanwhile (the benchmark's segment:
    25.7 CPU seconds in 16.5 s on two cores).  Two bands' rows are held then, at most 2 x :data:`BAND_BYTES`.
    One thread writes, so that the bands of a file are written one after another and may go with direct I/O; with
    a pool of writing threads beside the sampling threads, the benchmark's render with a 1 GiB cache peaked at
    2.45 GiB, over its bound, against 1.75 GiB with one (more threads holding freed memory in glibc's per-thread
    arenas at once, we think).  On a cluster, bands of one file are written at once by several processes: through
    the page cache.
    """
    if not isinstance(executor, LocalExecutor):
        yield from executor.run(render_band, job, bands)
        return
    writing: tuple[Band, Future[BandResult]] | None = None
    writer = ThreadPoolExecutor(1, "scrollzarr-band-write")
    try:
        for band in bands:
            sampled = sample_band(job, band)
            if writing is not None:
                yield writing[0], writing[1].result()
            writing = band, writer.submit(write_band, job, sampled, 1, True)
        if writing is not None:
            yield writing[0], writing[1].result()
    finally:
        # stopped: no band is left writing once the render's files are closed (waiting for a task queued after
        # every band's, on the one thread: a band submitted just as Ctrl-C came is waited for too)
        wait_out(writer.submit(int))
        writer.shutdown(wait=False)  # (its one thread has nothing left to do)


def _write_rows(job: RenderJob, target: ImageRows, first: int, rows: np.ndarray, direct: bool) -> None:
    """Write ``rows`` (shape (rows, width)) as rows ``first …`` of the image ``target`` of ``job`` (with direct I/O
    if ``direct``)."""
    with target.open(direct) as file:
        # Checked after the file is open: the lock's mark then proves the file is this run's (the next render of
        # it marks the lock before it makes its files; a finished or failed one removes the lock file).
        if job.remote and (target.lock is None or holder(target.lock) != job.run):
            raise StaleRender(
                f"{target.path} is no longer written by the render this band belongs to (it stopped); nothing written"
            )
        file.write(first, rows)
        if job.remote:  # the client's flush of its own descriptor covers this machine's writes only
            os.fdatasync(file.fd)


_samplers: weakref.WeakKeyDictionary[RenderJob, _Sampler] = weakref.WeakKeyDictionary()
_samplers_lock = threading.Lock()


def _sampler(job: RenderJob) -> _Sampler:
    """This process's sampler of ``job``'s volume, made by its first band and kept while the job lives.

    The bands a process renders share its chunk cache, as the tiles of one
    band do (neighbouring bands need mostly the same chunks).  A Dask worker
    holds the job (sent once) until the run is over, then drops it, and the
    cache with it.
    """
    with _samplers_lock:
        sampler = _samplers.get(job)
        if sampler is None:
            sampler = _samplers[job] = _Sampler(job)
        return sampler


class _Sampler:
    """A job's volume, opened in this process, and its chunk cache."""

    def __init__(self, job: RenderJob) -> None:
        # A Dask worker trims its heap at 64 KiB (distributed's MALLOC_TRIM_THRESHOLD_): measured, a band then took
        # 3.9 s instead of 0.9 s, most of it page faults in the kernel.
        keep_freed_memory()
        self.volume = open_volume(job.zarr, job.level, job.cache)
        self.remote = is_url(job.zarr)
        self.shape = self.volume.shape
        self.dtype = self.volume.array.dtype
        self.offsets = layer_offsets(job.layers, job.spacing, job.direction)
        self.cache = ChunkCache(self.volume.array, job.cache_bytes)
        self.kernel: Callable[..., None] = self._sample_box
        self.pixels: Callable[..., tuple[np.ndarray, int, np.ndarray, np.ndarray]] = mapped_pixels
        if job.compiled:  # the same samples and pixels, bit for bit
            from scrollzarr import kernel

            def sample_in_chunks(
                lo: np.ndarray,
                hi: np.ndarray,
                p: np.ndarray,
                n: np.ndarray,
                offsets: np.ndarray,
                out: np.ndarray,
                where: np.ndarray,
            ) -> None:
                kernel.sample_chunks(self.cache.table(lo, hi), p, n, offsets, self.shape, out, where)

            self.kernel = sample_in_chunks
            self.pixels = kernel.mapped_pixels
        self.too_big: Callable[[np.ndarray, np.ndarray], bool] = (
            self._too_many_chunks if job.compiled else lambda lo, hi: bool(np.prod(hi - lo) > MAX_BOX_VOXELS)
        )

    def _too_many_chunks(self, lo: np.ndarray, hi: np.ndarray) -> bool:
        """Whether the chunks of the box ``[lo, hi)`` hold more than :data:`MAX_TABLE_BYTES`."""
        return len(self.cache.chunks_of(lo, hi)) * chunk_nbytes(self.volume.array) > MAX_TABLE_BYTES

    def tile(
        self,
        job: RenderJob,
        stats: CacheStats,
        rows: tuple[int, int],
        columns: tuple[int, int],
        layers: np.ndarray,
        stacked: np.ndarray | None,
    ) -> tuple[int, int]:
        """Sample pixels ``[v0:v1, u0:u1]`` into ``layers`` (N, rows, columns) and ``stacked`` (rows, columns),
        counting the chunks read into ``stats``.

        Returns
        -------
        mapped, nonfinite : int
        """
        mapped, nonfinite, p, n = self._pixels(job, rows, columns)
        count = p.shape[1]
        if count:
            with self.cache.counting(stats):
                self._sample(p, n, layers, np.stack(np.nonzero(mapped)))
            if stacked is not None:  # (an unmapped pixel's layers are 0, and so is its stacked value)
                stacked[...] = stack(layers, job.stacked, job.stack_filter)
        return count, nonfinite

    def _pixels(
        self, job: RenderJob, rows: tuple[int, int], columns: tuple[int, int]
    ) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """The pixels ``[v0:v1, u0:u1]`` that are mapped (a mask), how many have non-finite coordinates, and the
        mapped pixels' positions and normals in array voxels, each shape (3, M)."""
        positions, normals = job.surface.rows(*rows, *columns)
        return self.pixels(positions, normals, job.flip_normals, self.volume.translation, self.volume.scale)

    def _boxes(self, p: np.ndarray, n: np.ndarray) -> Iterator[tuple[slice, slice, np.ndarray, np.ndarray]]:
        """The pieces the kernel samples ``p``, ``n`` (3, M) in: pixels, layers and their box ``[lo, hi)`` of
        voxels, halving the pixels (or the layers) while the box is too big (:data:`MAX_BOX_VOXELS` for the
        numpy kernel, which copies it; its chunks' :data:`MAX_TABLE_BYTES` for the compiled one)."""
        pieces = [(0, p.shape[1], 0, len(self.offsets))]
        while pieces:
            a, b, c, d = pieces.pop()
            lo, hi = sample_bounds(p[:, a:b], n[:, a:b], self.offsets[c:d], self.shape)
            if self.too_big(lo, hi):
                if b - a > 1:
                    pieces += [((a + b) // 2, b, c, d), (a, (a + b) // 2, c, d)]
                    continue
                if d - c > 1:
                    pieces += [(a, b, (c + d) // 2, d), (a, b, c, (c + d) // 2)]
                    continue
            yield slice(a, b), slice(c, d), lo, hi

    def _sample(self, p: np.ndarray, n: np.ndarray, layers: np.ndarray, where: np.ndarray) -> None:
        """Sample pixels ``p``, ``n`` (3, M) into ``layers`` (K, rows, columns) at ``where`` (2, M): their rows and
        columns."""
        for pixels, chosen, lo, hi in self._boxes(p, n):
            self.kernel(lo, hi, p[:, pixels], n[:, pixels], self.offsets[chosen], layers[chosen], where[:, pixels])

    def _sample_box(
        self,
        lo: np.ndarray,
        hi: np.ndarray,
        p: np.ndarray,
        n: np.ndarray,
        offsets: np.ndarray,
        layers: np.ndarray,
        where: np.ndarray,
    ) -> None:
        """The numpy kernel: samples of ``p``, ``n`` (3, M) at ``offsets`` (K,) into ``layers`` (K, rows,
        columns) at ``where`` (2, M), from the box of voxels ``[lo, hi)`` copied out of the cached chunks."""
        samples = np.empty((len(offsets), p.shape[1]), layers.dtype)
        sample_layers(self.cache.box(lo, hi), lo, p, n, offsets, self.shape, samples)
        layers[:, where[0], where[1]] = samples

    def chunks(self, job: RenderJob, rows: tuple[int, int], columns: tuple[int, int]) -> list[ChunkIndex]:
        """The chunks of the volume that :meth:`tile` reads for the same pixels, in the order it reads them."""
        _, _, p, n = self._pixels(job, rows, columns)
        if not p.shape[1]:
            return []
        return [index for _, _, lo, hi in self._boxes(p, n) for index in self.cache.chunks_of(lo, hi)]


class Prefetch:
    """Reads a band's chunks ahead of its tiles, on a thread of its own: the chunks of the tiles in the order the
    tiles are sampled, started while those of the tiles not yet begun fit in a quarter of the chunk cache.

    A volume on a web server costs a round trip for every chunk; a tile's
    thread reading its chunks one at a time would wait them out one after the
    other.
    """

    def __init__(
        self,
        sampler: _Sampler,
        job: RenderJob,
        tiles: list[tuple[tuple[int, int], tuple[int, int]]],
        stats: CacheStats,
    ) -> None:
        self.sampler = sampler
        self.stats = stats
        self.job = job
        self.tiles = tiles
        self.budget = max(1, job.cache_bytes // 4 // chunk_nbytes(sampler.volume.array))
        self.begun = 0  # tiles whose sampling has begun
        self.ahead: list[int] = []  # the tile of every chunk started, in order
        self.stopped = False
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="prefetch-band", daemon=True)
        self.thread.start()

    def begin(self, tile: int) -> None:
        """Tile number ``tile`` is being sampled: the chunks of those before it no longer count as ahead."""
        with self.condition:
            self.begun = max(self.begun, tile + 1)
            self.condition.notify()

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join()

    def _run(self) -> None:
        seen: set[ChunkIndex] = set()
        for number, (rows, columns) in enumerate(self.tiles):
            indices = [index for index in self.sampler.chunks(self.job, rows, columns) if index not in seen]
            seen.update(indices)
            with self.condition:
                while not self.stopped and sum(tile >= self.begun for tile in self.ahead) >= self.budget:
                    self.condition.wait()
                if self.stopped:
                    return
                self.ahead += [number] * len(indices)
            self.sampler.cache.prefetch(indices, FETCHES, self.stats)


def _check_paths(
    ppm_path: Path,
    zarr_path: Path | str,
    output_dir: Path,
    stack_path: Path | None,
    names: list[str],
    part: RenderPart,
) -> None:
    """Refuse outputs that would overwrite the inputs or each other (paths resolved, so ``..`` and links count)."""
    # a remote volume is nowhere here: a path that cannot be anywhere
    store = Path("/\0remote") if isinstance(zarr_path, str) else _store_root(zarr_path.resolve())
    out = output_dir.resolve()
    if out == store or store in out.parents:
        raise ScrollzarrError(
            f"OUTPUT_TIFF_DIR {output_dir} is inside the zarr store {store}; write the layers elsewhere"
        )
    ours = {out / name for name in (*names, part.name(manifest.MANIFEST_NAME), part.name(LOCK_NAME))}
    ppm = ppm_path.resolve()
    if ppm in ours:
        raise ScrollzarrError(
            f"the .ppm {ppm_path} is also a layer TIFF of OUTPUT_TIFF_DIR; move it or write the layers elsewhere"
        )
    if stack_path is None:
        return
    stack = stack_path.resolve()
    if stack == ppm:
        raise ScrollzarrError(f"OUTPUT_STACK_TIFF {stack_path} is the .ppm; give the stacked image another name")
    if is_tifxyz(ppm_path) and stack in {(ppm / name).resolve() for name in (*COORDINATES, MASK, META)}:
        raise ScrollzarrError(
            f"OUTPUT_STACK_TIFF {stack_path} is a file of the tifxyz surface {ppm_path}; give the stacked image "
            "another name"
        )
    if stack == store or store in stack.parents:
        raise ScrollzarrError(
            f"OUTPUT_STACK_TIFF {stack_path} is inside the zarr store {store}; write the stacked image elsewhere"
        )
    if stack in ours:
        what = "a layer TIFF" if stack.name in names else "a record ppm_to_layers keeps in OUTPUT_TIFF_DIR"
        raise ScrollzarrError(
            f"OUTPUT_STACK_TIFF {stack_path} is also {what} ({stack}); give the stacked image another name"
        )
    if stack == out:
        raise ScrollzarrError(f"OUTPUT_STACK_TIFF {stack_path} is OUTPUT_TIFF_DIR; give the stacked image a file name")


def _store_root(path: Path) -> Path:
    """The zarr store that holds ``path``: the outermost enclosing directory of zarr groups (or arrays)."""
    root = path
    while root != root.parent and any((root.parent / key).exists() for key in ZARR_METADATA):
        root = root.parent
    return root


def stack_lock_name(stack_path: Path) -> str:
    """The lock file that holds the stacked image, beside it."""
    return f".{stack_path.name}.lock"


def _check_outputs(
    output_dir: Path, stack_path: Path | None, overwrite: bool, names: list[str], part: RenderPart
) -> None:
    """Refuse to write into a directory that holds files (of a whole render: any; of a part: the part's own)
    without ``--overwrite``."""
    if renderprogress.exists(output_dir, part.name(renderprogress.NAME)) and not overwrite:
        what = "a render" if not part.suffix else f"part {part.number} of a render"
        raise ScrollzarrError(
            f"{output_dir} holds {what} that stopped before it finished; continue it with --resume (and the same "
            "arguments), or add --overwrite to start again"
        )
    if part.suffix:
        mine = {*names, *(hidden_partial_path(output_dir / name).name for name in names)}
        clash = sorted(path.name for path in output_dir.iterdir() if path.name in mine)
        if clash and not overwrite:
            raise ScrollzarrError(
                f"{output_dir} holds files of part {part.number} already ({clash[0]}, ...); add --overwrite to "
                "replace them"
            )
    else:
        locks = {LOCK_NAME} if stack_path is None else {LOCK_NAME, stack_lock_name(stack_path)}
        if any(path.name not in locks for path in output_dir.iterdir()) and not overwrite:
            raise ScrollzarrError(
                f"{output_dir} is not empty; add --overwrite to replace its layer TIFFs (other files are kept), "
                "or choose an empty directory"
            )
    if stack_path is not None:
        if stack_path.is_dir():
            raise ScrollzarrError(f"{stack_path} is a directory; OUTPUT_STACK_TIFF must be a file name")
        if stack_path.exists() and not overwrite:
            raise ScrollzarrError(f"{stack_path} exists; add --overwrite to replace it")


def check_space(output_dir: Path, stack_path: Path | None, image: int, layers: int) -> None:
    """Refuse to start a run whose TIFFs (``image`` bytes each) cannot fit on their file systems."""
    needs = [(output_dir, image * layers, "layer TIFFs")]
    if stack_path is not None:
        needs.append((stack_path.parent, image, "stacked image"))
    for where, nbytes, what in needs:
        existing = where
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if nbytes > free:
            raise ScrollzarrError(
                f"the {what} need {format_bytes(nbytes)} and {where} has {format_bytes(free)} free; "
                "free some space or write them elsewhere"
            )
