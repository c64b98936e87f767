"""The conversion: a TIFF stack becomes a multi-resolution OME-Zarr (or one plain zarr array).

Level 0 is read from the TIFFs once, a band at a time (whole planes unless
``--max_gb`` asks for less), and streamed through every level the band is
chunk-aligned for: those levels are built as level 0 is read and never read
back.  Levels below them are built from the stored level above, block by block.
The ``multiscales`` metadata is written last, so a store without it is
unfinished.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from scrollzarr import downsample as ds
from scrollzarr import memory, ngff, progress
from scrollzarr.blocks import Shape3, iter_boxes
from scrollzarr.cluster import Executor, LocalExecutor
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.ngff_v04 import Multiscale
from scrollzarr.options import Options
from scrollzarr.progress import Progress
from scrollzarr.ranges import parse_ranges
from scrollzarr.readback import build_from_above
from scrollzarr.report import LevelReport, ProgressBar, Report, chunk_count, format_runs, progress_bar
from scrollzarr.sinks import SinkSpec, open_sink
from scrollzarr.sizes import format_bytes
from scrollzarr.storage import Location, ObjectStore, storage, zarr_store
from scrollzarr.store import (
    OutputError,
    check_output_name,
    check_replaceable,
    damaged_units,
    empty_output,
    is_abandoned,
    is_emptied,
    is_zarr_store,
    read_region,
    readable_metadata,
    remove_partial_files,
    remove_unreadable_metadata,
    unit_index,
)
from scrollzarr.streaming import LevelStream, band_streams, stream_slabs, stripe_rows
from scrollzarr.tasks import (
    Job,
    SliceSource,
    Task,
    level_tasks,
    put_fence,
    remove_markers,
    run_levels,
    unmark_damaged,
)
from scrollzarr.tiffstack import (
    TiffStack,
    check_z_extent,
    file_list,
    numbered_tiffs,
    open_stack,
)
from scrollzarr.window import Window, resolve_window
from scrollzarr.workers import Workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """A conversion fully worked out before anything is written.

    Attributes
    ----------
    origin : (int, int, int)
        Scan position (z = slice number, y = row, x = column) of level-0 voxel (0, 0, 0).
    cropped : bool
        Whether ``--ranges`` was given (the metadata then carries ``origin`` as a translation).
    shapes : tuple of (int, int, int)
        Shape of each level, z, y, x.
    missing : list of (int, int)
        Runs ``[start, stop)`` of slice numbers inside the converted z range
        without a file (written as zeros), from the first file on.
    bands : memory.BandPlan
        How level 0 is cut, and how many levels are streamed with it.
    blocks : tuple of (int, int, int)
        Blocks of the levels built from the stored level above (after the streamed ones).
    need : int
        Bytes the buffers use at the most, by :mod:`scrollzarr.memory`'s model.
    fingerprint : dict
        The options a resumed run must share with the stopped one, and a digest of ``slice_files``.
    slice_files : list of (str, int, int)
        The input's slice files in the converted z range: name, size (bytes), modification time (ns).
    resume_from : Progress or None
        The progress record of the stopped run, with ``--resume``.
    window : Window or None
        How uint16 becomes uint8 (``--window``); ``None`` for ``value // 256`` or no conversion.
    tasks : bool
        Whether the run is cut into tasks (:mod:`scrollzarr.tasks`): on a Dask cluster, or resuming such a
        run here.  Level 0 is then converted in boxes of one row of write units in z by a band, and every
        level below from the stored level above, in ``blocks`` (then one per level from level 1).
    """

    input_dir: Path
    output: Location
    options: Options
    stack: TiffStack
    origin: Shape3
    cropped: bool
    shapes: tuple[Shape3, ...]
    dtype: np.dtype
    missing: list[tuple[int, int]]
    bands: memory.BandPlan
    blocks: tuple[Shape3, ...]
    need: int
    fingerprint: dict[str, Any]
    slice_files: progress.SliceFiles
    resume_from: Progress | None
    window: Window | None = None
    tasks: bool = False


def plan_conversion(input_dir: Path, output: Location, options: Options, slots: int = 1, parallel: int = 1) -> Plan:
    """Discover the stack, check every header and work out shapes, bands, blocks and memory.

    Parameters
    ----------
    slots : int
        Tasks a worker process runs at once (on a Dask cluster, its threads): ``--max_gb`` bounds a
        process, so each task has that share of it.
    parallel : int
        Tasks the cluster runs at once: each level is cut into at least as many tasks where it can be.

    Raises
    ------
    ScrollzarrError
        For any problem with the input, the output path or the options.
    """
    check_output_name(output)
    if isinstance(output, ObjectStore):
        output.check_bucket()
    record = _existing_output(output, options, input_dir)
    if isinstance(output, ObjectStore) and options.scheduler is None and (record is None or not record.tasks):
        raise UsageError(
            f"output {output}: writing to S3 runs as tasks; add --scheduler (local:N for N worker processes "
            "on this machine, e.g. --scheduler local:2)"
        )
    z_range, y_range, x_range = parse_ranges(options.ranges)
    files = numbered_tiffs(input_dir)
    z0, z1 = z_range.resolve(max(files) + 1)
    selected = {z: path for z, path in files.items() if z0 <= z < z1}
    check_z_extent(selected, z0, z1)
    stack = open_stack(selected, options.bad_slices)
    slice_files = file_list(selected, stack)
    y0, y1 = y_range.resolve(stack.shape[0])
    x0, x1 = x_range.resolve(stack.shape[1])
    if options.obytes == 1 and stack.dtype not in (np.uint8, np.uint16):
        raise UsageError(f"--obytes 1 converts uint16 to uint8, but the slices are {stack.dtype}; leave it out")
    out_dtype = np.dtype(np.uint8) if options.obytes == 1 else stack.dtype
    window = resolve_window(options.window, stack, (z0, z1), (y0, y1), (x0, x1), options.bad_slices)
    shapes = ds.level_shapes((z1 - z0, y1 - y0, x1 - x0), 1 if options.zarr_only else options.nlevels)
    layout = memory.Layout(
        shapes=shapes,
        chunk=options.chunk_size,
        in_itemsize=stack.dtype.itemsize,
        out_itemsize=out_dtype.itemsize,
        slice_shape=stack.shape,
        decode_bytes=stack.decode_bytes,
        algorithm=options.algorithm,
        workers=options.worker_count,
        unit=options.layout.shard,
        encoded=options.compressor != "none",
    )
    fingerprint = {
        "input_directory": str(input_dir.resolve()),
        "chunk_size": options.chunk_size,
        "nlevels": options.nlevels,
        "region_zyx": [z0, z1, y0, y1, x0, x1],
        "algorithm": options.algorithm,
        "obytes": options.obytes,
        "zarr_only": options.zarr_only,
        "bad_slices": options.bad_slices,
        "slices": progress.slices_digest(slice_files),
        **options.layout.fingerprint(),
        "window": None if window is None else [window.low, window.high],
    }
    if record is not None:
        changed = progress.input_change(record, slice_files, output)
        if changed:
            raise ScrollzarrError(
                f"cannot resume {output}: the input changed since the stopped run: {changed}; "
                "put the slice files back as they were, or start again with --overwrite"
            )
        differs = record.mismatch(fingerprint)
        if differs:
            raise UsageError(f"cannot resume {output}: {differs}; resume with the options of the stopped run")
    tasks = options.scheduler is not None or (record is not None and record.tasks)
    limit = None if options.max_gb is None else round(options.max_gb * memory.GIB)  # nearest byte: quoted back as given
    if limit is not None and tasks:
        limit //= slots
    bands = memory.plan_bands(layout, limit)
    if record is not None and (tasks or record.bands != [bands.rows, bands.cols, bands.streamed]):
        rows, cols, streamed = record.bands  # the stopped run's bands, so that its work fits
        cost = memory.band_cost(layout, rows, cols, streamed)  # a level-0 task streams its box as a band
        if record.bands != [bands.rows, bands.cols, bands.streamed]:
            log.info("resuming with the stopped run's bands of %d x %d (rows x columns)", rows, cols)
        bands = memory.BandPlan(rows, cols, streamed, cost)
    if tasks and record is None:  # level-0 tasks that write the most levels; else each a row of units in z
        several = memory.task_band(layout, limit, parallel)
        if several is None:
            depth = options.layout.unit[0]
            _, rows, cols = memory.split_for(shapes[0], (depth, bands.rows, bands.cols), layout.write_unit, parallel)
            several = memory.BandPlan(rows, cols, 0, memory.band_cost(layout, rows, cols, 0))
        bands = several
    first_read_back = bands.streamed + 1
    budget = limit if limit is not None else max(bands.nbytes, memory.read_back_need(layout, first_read_back))
    blocks = memory.read_back_blocks(layout, first_read_back, budget)
    if tasks:
        blocks = tuple(
            memory.split_for(shapes[level], block, layout.write_unit, parallel)
            for level, block in enumerate(blocks, start=1)
        )
    if record is not None and record.tasks:
        blocks = memory.recorded_blocks(blocks, record.blocks)
    need = max(bands.nbytes, memory.read_back_cost(layout, first_read_back, blocks))
    log.debug("memory: %d bytes planned for buffers", need)
    return Plan(
        input_dir=input_dir,
        output=output,
        options=options,
        stack=stack,
        origin=(z0, y0, x0),
        cropped=options.ranges is not None and options.ranges.strip() != "",
        shapes=shapes,
        dtype=out_dtype,
        missing=stack.missing_runs(max(z0, min(selected)), z1),
        bands=bands,
        blocks=blocks,
        need=need,
        fingerprint=fingerprint,
        slice_files=slice_files,
        resume_from=record,
        window=window,
        tasks=tasks,
    )


def _existing_output(output: Location, options: Options, input_dir: Path) -> Progress | None:
    """Check what is at ``output`` against ``--resume`` and ``--overwrite``; the record to resume from.

    Raises
    ------
    ScrollzarrError
        If there is nothing to resume, or the output exists unasked, or may not be replaced.
    """
    if options.resume:
        record = progress.load(output) if is_zarr_store(output) else None
        partial = isinstance(output, Path) and any(output.glob(f"{progress.KEY}.*.partial"))  # none in a bucket
        if record is None and is_abandoned(output) and partial:
            log.info("the stopped run wrote nothing; starting from the beginning")
            return None
        if record is None and is_emptied(output):
            raise ScrollzarrError(
                f"nothing to resume: {output} was left by a run stopped while it emptied it for --overwrite; "
                "start again with --overwrite"
            )
        if record is None:
            raise ScrollzarrError(
                f"nothing to resume: {output} is not an unfinished scroll_to_ome conversion; "
                "run without --resume (with --overwrite to replace it)"
            )
        _refuse_rebuild(output, record)
        if options.scheduler is not None and not record.tasks:
            raise UsageError(
                f"cannot resume {output} on a Dask cluster: it was started without --scheduler; "
                "resume it without --scheduler (and without DASK_SCHEDULER_ADDRESS set)"
            )
        return record
    if not options.overwrite and is_zarr_store(output) and progress.exists(output):
        _refuse_rebuild(output, progress.load(output))
        raise OutputError(
            f"{output} is an unfinished conversion; continue it with --resume (and the same options) "
            "or start again with --overwrite"
        )
    check_replaceable(output, options.overwrite, input_dir)
    return None


def _refuse_rebuild(output: Location, record: Progress | None) -> None:
    """Refuse to take the record of an unfinished ``--first_new_level`` rebuild for a conversion's."""
    first = None if record is None else record.fingerprint.get("rebuild_from_level")
    if first is not None:
        raise ScrollzarrError(
            f"{output} is an unfinished --first_new_level {first} rebuild, not a conversion; "
            f"continue it with --first_new_level {first} --resume (and the rebuild's other options)"
        )


def _describe_levels(shapes: Iterable[Shape3], chunk: int, itemsize: int) -> list[str]:
    lines, total = [], 0
    for level, shape in enumerate(shapes):
        count = chunk_count(shape, chunk)
        total += count
        lines.append(f"  level {level}: {shape[0]} x {shape[1]} x {shape[2]} (z, y, x), {count} chunks")
    lines.append(
        f"  {total} chunks, at most {format_bytes(total * chunk**3 * itemsize)} (all-zero chunks are not written)"
    )
    return lines


def describe_plan(plan: Plan) -> str:
    """The plan as text, for ``--dry_run``."""
    stack, chunk = plan.stack, plan.options.chunk_size
    (z0, y0, x0), (nz, ny, nx) = plan.origin, plan.shapes[0]
    slices = sorted(stack.slices)
    layout = plan.options.layout
    ngff = "0.4" if layout.zarr_format == 2 else "0.5"
    kind = "plain zarr array" if plan.options.zarr_only else f"OME-Zarr, NGFF {ngff}"
    lines = [
        f"input: {plan.input_dir}",
        f"  {len(slices)} slice files, numbers {slices[0]} to {slices[-1]}, "
        f"each {stack.shape[0]} x {stack.shape[1]} (rows x columns) {stack.dtype}",
        f"  missing slices (written as zeros): {format_runs(plan.missing) or 'none'}",
        f"  converting x {x0}:{x0 + nx}, y {y0}:{y0 + ny}, z {z0}:{z0 + nz}",
        f"output: {plan.output} ({kind}), {plan.dtype}, downsampling {plan.options.algorithm}",
    ]
    if plan.options.preset is not None:
        lines.append(f"  preset {plan.options.preset}")
    lines.append(f"  layout: {layout.describe()}")
    if plan.dtype != stack.dtype:
        lines.append(f"  {stack.dtype} to {plan.dtype}: {_describe_window(plan.window)}")
    lines += _describe_levels(plan.shapes, chunk, plan.dtype.itemsize)
    if plan.tasks:
        lines += _describe_tasks(plan)
        return "\n".join(lines)
    lines.append(
        f"memory: about {format_bytes(plan.need)} for buffers, {plan.options.worker_count} worker(s); "
        f"level 0 read in bands of {plan.bands.rows} x {plan.bands.cols} (rows x columns)"
    )
    lines.append("  " + _describe_passes(plan.bands.streamed, len(plan.shapes) - 1))
    return "\n".join(lines)


def _describe_tasks(plan: Plan) -> list[str]:
    where = f"on the Dask cluster at {plan.options.scheduler}" if plan.options.scheduler else "on this machine"
    tasks = _conversion_tasks(plan)
    below = plan.bands.streamed
    depth = memory.task_depth(plan.options.layout.unit[0], plan.shapes[0][0], below + 1)
    writes = f", writing levels 0 to {below} (each halved in memory)" if below else ""
    return [
        f"tasks, {where}: {sum(map(len, tasks.values()))} in all, {plan.options.worker_count} thread(s) each, "
        f"about {format_bytes(plan.need)} each for buffers",
        f"  level 0: {len(tasks[0])} task(s) of {depth} slices by {plan.bands.rows} x {plan.bands.cols} "
        f"(rows x columns), from the TIFFs{writes}",
        *(
            f"  level {level}: {len(work)} task(s) from the stored level {level - 1}"
            for level, work in tasks.items()
            if level
        ),
    ]


def _describe_window(window: Window | None) -> str:
    if window is None:
        return "value // 256 (--obytes 1)"
    return (
        f"window {window.text()} ({window.source}): {window.low} and below to 0, {window.high} and above to 255, "
        "linear between, rounded to nearest (halves up)"
    )


def _levels_text(first: int, last: int) -> str:
    return f"level {first}" if first == last else f"levels {first} to {last}"


def _describe_passes(streamed: int, last: int) -> str:
    text = f"{_levels_text(0, streamed)} built in one pass over the TIFFs"
    if streamed < last:
        text += f"; {_levels_text(streamed + 1, last)} from the stored level above each"
    return text


Band = tuple[tuple[int, int], tuple[int, int]]


class _Run:
    """One conversion under way: its arrays, workers, progress bar, report and progress record."""

    def __init__(
        self, plan: Plan, arrays: list[zarr.Array], record: Progress, workers: Workers, bar: ProgressBar
    ) -> None:
        self.plan = plan
        self.arrays = arrays
        self.writers = [open_sink(_sink_spec(plan, level)) for level in range(len(arrays))]
        self.record = record
        self.workers = workers
        self.bar = bar
        # bad slice -> its first row written as zeros (scan rows); a slice whose header is bad: row 0
        self.bad = {z: record.bad_rows.get(str(z), 0) for z in record.bad_slices} | dict.fromkeys(plan.stack.bad, 0)
        self.bad_lock = threading.Lock()
        self.source = _slice_source(plan)
        self.report = Report(
            plan.output, plan.dtype, plan.options.layout, missing=plan.missing, plain=plan.options.zarr_only
        )
        for level, shape in enumerate(plan.shapes):
            self.report.levels[level] = LevelReport(
                shape, chunk_count(shape, plan.options.chunk_size), record.chunks_written.get(str(level), 0)
            )

    def checkpoint(self) -> None:
        """Record what is on disk now (every task of the last unit has finished)."""
        self.record.chunks_written = {str(k): v.chunks_written for k, v in self.report.levels.items()}
        self.record.bad_slices = sorted(self.bad)
        self.record.bad_rows = {str(z): row for z, row in sorted(self.bad.items())}
        self.record.save(self.plan.output)

    def read_slice(self, z: int, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray) -> None:
        """Read rows of slice ``z`` (scan numbering) into ``out`` by :meth:`SliceSource.read`'s rule; the bad
        slices found are kept in the record, so that a slice is zeros from the same row in every band from then
        on, and after ``--resume``."""
        self.source.read(z, rows, cols, out, self.bad, self.bad_lock)

    def convert_band(self, band: Band) -> None:
        """Read one band of level 0 from the TIFFs and stream it through the streamed levels."""
        plan, record = self.plan, self.record
        unit, streamed = plan.options.layout.unit, plan.bands.streamed
        depth = unit[0]
        streams = band_streams(
            ((0, plan.shapes[0][0]), *band), streamed + 1, plan.dtype, unit, plan.options.algorithm,
            self.writers, self.workers, self.bar.update,
        )  # fmt: skip
        base = [self.report.levels[level].chunks_written for level in range(len(streams))]
        if record.streams:
            self._restore(streams)
        planes = plan.shapes[0][0]
        oz, oy, ox = plan.origin
        rows = (oy + band[0][0], oy + band[0][1])
        cols = (ox + band[1][0], ox + band[1][1])
        begin = record.slabs_done

        def after(number: int) -> None:
            for level, stream in enumerate(streams):
                self.report.levels[level].chunks_written = base[level] + stream.chunks_written
            record.slabs_done = begin + number + 1
            record.streams = [stream.state() for stream in streams]
            self.checkpoint()

        slabs = [range(oz + z, oz + min(z + depth, planes)) for z in range(begin * depth, planes, depth)]
        stripe = stripe_rows(unit[1], plan.options.algorithm, bool(plan.stack.decode_bytes))
        stream_slabs(streams[0], plan.stack, slabs, rows, cols, stripe, self.read_slice, after)
        record.bands_done += 1
        record.slabs_done, record.streams = 0, []
        self.checkpoint()

    def _restore(self, streams: list[LevelStream]) -> None:
        """Take the streams of the band in progress back to where the record says they were."""
        for level, (stream, state) in enumerate(zip(streams, self.record.streams, strict=True)):
            stream.restore(state, self._stored(level, stream))
        for level, stream in enumerate(streams[:-1]):
            stream.restore_below(self._stored(level, stream))
        slices = self.record.slabs_done * self.plan.options.layout.unit[0]
        log.info("resuming band %d after %d slices", self.record.bands_done + 1, slices)

    def _stored(self, level: int, stream: LevelStream) -> Callable[[int, int], np.ndarray]:
        array = self.arrays[level]
        (y0, y1), (x0, x1) = stream.rows, stream.cols
        # its damaged chunks were written again first
        return lambda z0, z1: read_region(array, (slice(z0, z1), slice(y0, y1), slice(x0, x1)))


def _stack_attributes(plan: Plan, bad: list[int], bad_rows: dict[int, int]) -> dict[str, Any]:
    return {
        "source_directory": str(plan.input_dir.resolve()),
        "origin_zyx": list(plan.origin),
        "missing_slices": [z for start, stop in plan.missing for z in range(start, stop)],
        "bad_slices": bad,
        "bad_slice_rows": {str(z): row for z, row in sorted(bad_rows.items())},
        "obytes": plan.options.obytes,
        "window": None if plan.window is None else [plan.window.low, plan.window.high],
        "window_source": _window_source(plan),
    }


def _window_source(plan: Plan) -> str | None:
    """How uint16 became uint8: ``"given"`` or ``"auto"`` (``--window``), ``"obytes"`` (``value // 256``);
    ``None`` if the voxels are stored as read."""
    if plan.window is not None:
        return plan.window.source
    return "obytes" if plan.dtype != plan.stack.dtype else None


def _open_output(plan: Plan) -> tuple[zarr.Group | None, list[zarr.Array], Progress]:
    """Create the store, or, resuming, open it, repair what the record cannot vouch for, and drop temporary files.

    A new store gets its progress record first, so that at every instant it is
    recognisably unfinished and resumable; then the group and the level arrays
    (a stop before those are written leaves levels that ``--resume`` creates).
    """
    record = plan.resume_from
    if record is None:
        empty_output(plan.output)
        record = Progress(plan.fingerprint, [plan.bands.rows, plan.bands.cols, plan.bands.streamed], tasks=plan.tasks)
        if plan.tasks:
            record.blocks = [list(block) for block in plan.blocks]
            record.run = uuid.uuid4().hex
        record.save(plan.output)
        progress.save_slices(plan.output, plan.slice_files)  # after the record: its digest suffices to resume
    else:
        leftovers = remove_partial_files(plan.output)
        log.debug("removed %d temporary files of the stopped run", leftovers)
        remove_unreadable_metadata(plan.output)
    if plan.options.zarr_only:
        arrays, group = [_level(plan.output, None, plan)], None
    else:
        group = zarr.open_group(zarr_store(plan.output), mode="a", zarr_format=plan.options.zarr_format)
        arrays = [_level(group, str(level), plan) for level in range(len(plan.shapes))]
    # the metadata just written is durable before any chunk is (a name renamed in but not flushed can come
    # back empty after a power cut); the first checkpoint would flush it only after the first slab
    storage(plan.output).sync()
    if plan.resume_from is not None and not record.tasks:  # a run of tasks: _convert_tasks
        _rewrite_damaged(plan, arrays, record)
    return group, arrays, record


def _rewrite_damaged(plan: Plan, arrays: list[zarr.Array], record: Progress) -> None:
    """Find the damaged unit files (:func:`~scrollzarr.store.damaged_units`), take the record back to before
    the first unit of work that wrote each, save it, then delete them: the resumed run writes them again.

    A damaged unit of a streamed level goes back to the start of its band (the
    streams cannot be restored from damaged planes); one of a level built from
    the level above, to its row of blocks.
    """
    damaged = []
    for level in range(len(arrays)):
        spec = _sink_spec(plan, level)
        for path, problem in damaged_units(spec):
            log.warning("chunk file %s is damaged (%s); it is written again", path, problem)
            z, y, x = (i * n for i, n in zip(unit_index(spec, path), spec.layout.unit, strict=True))
            if level <= plan.bands.streamed:
                _, height, width = plan.shapes[0]
                scale = 2**level
                bands = _bands(height, width, plan.bands)
                band = next(i for i, ((_, r1), (_, c1)) in enumerate(bands) if y * scale < r1 and x * scale < c1)
                if band < record.bands_done or (band == record.bands_done and record.slabs_done):
                    record.bands_done, record.slabs_done, record.streams = band, 0, []
            else:
                row = z // plan.blocks[level - plan.bands.streamed - 1][0]
                record.rows_done[str(level)] = min(record.rows_done.get(str(level), 0), row)
            damaged.append(path)
    record.forget(plan.output, damaged)


def _sink_spec(plan: Plan, level: int) -> SinkSpec:
    """What the sink of ``level`` needs (the store's root array for ``--zarr_only``)."""
    directory = plan.output if plan.options.zarr_only else plan.output / str(level)
    return SinkSpec(directory, plan.shapes[level], str(plan.dtype), plan.options.layout)


def _level(parent: zarr.Group | Location, name: str | None, plan: Plan) -> zarr.Array:
    """Level ``name`` of the store (the array at ``parent`` for ``--zarr_only``), created if it is not whole yet.

    zarr 2 writes an array's ``.zarray`` and then its ``.zattrs``; a stop between
    them leaves the level half described, and a power cut may leave either
    (or zarr 3's ``zarr.json``) empty, so unless all parse all are written
    again.  Its chunks, if any, are kept: those the record vouches for are
    valid, the others are written again.
    """
    directory = plan.output if name is None else plan.output / name
    layout = plan.options.layout
    metadata = [directory / file for file in layout.metadata_names]
    if not all(readable_metadata(path) for path in metadata):
        for path in metadata:
            if isinstance(path, Path):  # in a bucket, an object is put whole: it parses, or is not there
                path.unlink(missing_ok=True)
        shape = plan.shapes[0 if name is None else int(name)]
        target = parent if isinstance(parent, zarr.Group) else zarr_store(parent)
        return layout.create_array(target, name, shape, plan.dtype, overwrite=False)
    if isinstance(parent, zarr.Group):
        assert name is not None  # every level of a group has a name; only --zarr_only's root array has none
        array = parent[name]
    else:
        array = zarr.open_array(zarr_store(parent), mode="r+")
    assert isinstance(array, zarr.Array)
    return array


def convert(plan: Plan, executor: Executor | None = None) -> Report:
    """Carry out ``plan`` (or continue it, with ``--resume``): write the store, metadata last.

    After every unit of work the progress record in the store says what is on
    disk; it is removed once the metadata is written.  The caller holds the
    output's :class:`~scrollzarr.outputlock.OutputLock` from before planning.
    A plan of tasks runs on ``executor`` (a Dask cluster), or, resuming a
    cluster's run without one, on this machine's threads.

    Returns
    -------
    Report
        Chunks written per level and the time taken.
    """
    started = time.monotonic()
    if plan.missing:
        log.warning("no file for slice(s) %s; they are written as zeros", format_runs(plan.missing))
    if plan.tasks:
        report = _convert_tasks(plan, executor or LocalExecutor(plan.options.worker_count))
        report.seconds = time.monotonic() - started
        return report
    group, arrays, record = _open_output(plan)
    log.debug(
        "level 0: bands of %d x %d (rows x columns), %s",
        plan.bands.rows, plan.bands.cols, _describe_streamed(plan.bands.streamed),
    )  # fmt: skip
    try:
        report = _convert(plan, group, arrays, record)
    except BaseException:
        log.warning("stopped; on disk and recorded: %s", _describe_progress(plan, record))
        raise
    report.seconds = time.monotonic() - started
    return report


def _describe_streamed(streamed: int) -> str:
    return f"{_levels_text(1, streamed)} streamed with it" if streamed else "no other level streamed with it"


def _describe_progress(plan: Plan, record: Progress) -> str:
    _, height, width = plan.shapes[0]
    bands = len(_bands(height, width, plan.bands))
    parts = [f"level 0: {record.bands_done} of {bands} band(s)"]
    if record.slabs_done:
        parts[0] += f" and {record.slabs_done * plan.options.layout.unit[0]} of {plan.shapes[0][0]} slices of the next"
    parts += [f"level {level}: {rows} chunk row(s)" for level, rows in sorted(record.rows_done.items())]
    return ", ".join(parts)


def _convert(plan: Plan, group: zarr.Group | None, arrays: list[zarr.Array], record: Progress) -> Report:
    options = plan.options
    _, height, width = plan.shapes[0]
    with progress_bar(plan.shapes, options.quiet) as bar, Workers(options.worker_count, writers=True) as workers:
        run = _Run(plan, arrays, record, workers, bar)
        bar.set_description(f"levels 0-{plan.bands.streamed}" if plan.bands.streamed else "level 0")
        bands = _bands(height, width, plan.bands)
        streamed_voxels = sum(math.prod(shape) for shape in plan.shapes[: plan.bands.streamed + 1])
        done = record.bands_done + record.slabs_done * options.layout.unit[0] / plan.shapes[0][0]
        bar.update(streamed_voxels * done / len(bands))
        for band in bands[record.bands_done :]:
            run.convert_band(band)
        if group is not None:
            assert isinstance(plan.output, Path)  # a store in a bucket is written as tasks (plan_conversion)
            build_from_above(
                group, plan.output, options.layout, plan.bands.streamed + 1, plan.blocks, options.algorithm,
                workers, bar, run.report, record, run.checkpoint, None,
            )  # fmt: skip
    run.report.bad = sorted(run.bad)
    _finish(plan, group, arrays, run.bad)
    return run.report


def _finish(plan: Plan, group: zarr.Group | None, arrays: list[zarr.Array], bad: dict[int, int]) -> None:
    """Write the attributes and the ``multiscales`` metadata that finish the store, then remove the record."""
    attributes = _stack_attributes(plan, sorted(bad), bad)
    if group is None:
        arrays[0].attrs["scrollzarr"] = attributes
    else:
        multiscale = Multiscale.pyramid(
            plan.output.stem,
            len(plan.shapes),
            plan.origin if plan.cropped else None,
            plan.options.algorithm,
            ds.parameters(plan.options.algorithm),
        )
        group.attrs.update({"scrollzarr": attributes, **ngff.attributes(multiscale, plan.options.zarr_format)})
    remove_markers(plan.output)
    progress.remove(plan.output)


def _slice_source(plan: Plan) -> SliceSource:
    return SliceSource(plan.stack, str(plan.dtype), plan.window, plan.options.bad_slices)


def _conversion_tasks(plan: Plan) -> dict[int, list[Task]]:
    """The tasks, by the level they start at: level 0's in boxes of a band by ``unit depth x 2**k`` slices,
    each writing levels 0 … k (``k``: ``plan.bands.streamed``); each lower level's in its read-back blocks."""
    below = plan.bands.streamed
    depth = memory.task_depth(plan.options.layout.unit[0], plan.shapes[0][0], below + 1)
    boxes = iter_boxes(plan.shapes[0], (depth, plan.bands.rows, plan.bands.cols))
    tasks = {0: [Task(0, box, below + 1) for box in boxes]}
    for level, block in enumerate(plan.blocks, start=below + 1):
        tasks[level] = level_tasks(plan.shapes[level], block, level)
    return tasks


def _convert_tasks(plan: Plan, executor: Executor) -> Report:
    """Carry out ``plan`` as tasks on ``executor``, a level at a time; a task finished before (its marker is in
    the store) is not run again.  The metadata is written last, here."""
    options = plan.options
    executor.check_paths(next(iter(plan.stack.slices.values())).path, plan.output)
    if isinstance(plan.output, ObjectStore):  # no lock file in a bucket: say what the user must keep to
        log.info("writing to %s: no other run may write this prefix until this one ends", plan.output)
    group, arrays, record = _open_output(plan)
    put_fence(plan.output, record.run)  # its tasks write while it is there
    levels = _conversion_tasks(plan)
    if plan.resume_from is not None and isinstance(plan.output, Path):  # an object in a bucket is put whole
        every = [task for tasks in levels.values() for task in tasks]
        for level in range(len(plan.shapes)):
            unmark_damaged(plan.output, record.run, level, _sink_spec(plan, level), every)
    bad = {z: record.bad_rows.get(str(z), 0) for z in record.bad_slices} | dict.fromkeys(plan.stack.bad, 0)
    job = Job(
        output=plan.output,
        run=record.run,
        levels=tuple(_sink_spec(plan, level) for level in range(len(plan.shapes))),
        algorithm=options.algorithm,
        source=_slice_source(plan),
        origin=plan.origin,
        threads=executor.threads,
        bad_rows=tuple(sorted(bad.items())),
    )
    report = Report(plan.output, plan.dtype, options.layout, missing=plan.missing, plain=options.zarr_only)
    with progress_bar(plan.shapes, options.quiet) as bar:
        totals = run_levels(executor, job, levels, bar)
    for level, total in totals.items():
        report.levels[level] = LevelReport(plan.shapes[level], chunk_count(plan.shapes[level], options.chunk_size))
        report.levels[level].chunks_written = total.chunks
        for z, row in total.bad_rows.items():
            bad[z] = min(row, bad.get(z, row))
    report.bad = sorted(bad)
    _finish(plan, group, arrays, bad)
    return report


def _bands(height: int, width: int, bands: memory.BandPlan) -> list[Band]:
    return [
        ((r, min(r + bands.rows, height)), (c, min(c + bands.cols, width)))
        for r in range(0, height, bands.rows)
        for c in range(0, width, bands.cols)
    ]
