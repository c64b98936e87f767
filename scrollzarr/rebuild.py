"""``--first_new_level``: build levels N … again in a finished OME-Zarr, from its level N-1."""

from __future__ import annotations

import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from scrollzarr import downsample as ds
from scrollzarr import memory, ngff, progress
from scrollzarr.blocks import Shape3, shape3
from scrollzarr.cluster import Executor, LocalExecutor
from scrollzarr.durable import sync_file_system
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.layout import StoreLayout, UnsupportedLayout, layout_of
from scrollzarr.ngff_v04 import Multiscale
from scrollzarr.options import MAX_SHARD_CHUNKS, Options
from scrollzarr.progress import Progress
from scrollzarr.readback import build_from_above
from scrollzarr.report import LevelReport, Report, chunk_count, progress_bar
from scrollzarr.sinks import SinkSpec
from scrollzarr.sizes import format_bytes
from scrollzarr.store import (
    DamagedChunkError,
    check_output_name,
    damaged_units,
    is_zarr_store,
    readable_metadata,
    remove_partial_files,
    unit_index,
)
from scrollzarr.tasks import (
    Job,
    Task,
    has_markers,
    level_tasks,
    put_fence,
    remove_markers,
    run_levels,
    unmark_damaged,
)
from scrollzarr.workers import Workers

log = logging.getLogger(__name__)

# The options a resumed rebuild must share with the stopped one (fingerprint key: command-line name).
REBUILD_OPTIONS = {
    "rebuild_from_level": "--first_new_level",
    "nlevels": "--nlevels",
    "chunk_size": "--chunk_size",
    "algorithm": "--algorithm",
}


@dataclass(frozen=True)
class RebuildPlan:
    """``--first_new_level``: levels to rebuild in an existing OME-Zarr.

    Attributes
    ----------
    fingerprint : dict
        The options (keys of :data:`REBUILD_OPTIONS`) and, under ``"multiscales"``,
        the group attributes that hold the store's ``multiscales`` metadata as they
        were before the rebuild (:func:`scrollzarr.ngff.removed`: 0.4's ``multiscales``
        or 0.5's whole ``ome``; the rebuild removes the metadata first, a resumed
        rebuild takes it from the record).
    resume_from : Progress or None
        The record of the stopped rebuild, with ``--resume``.
    tasks : bool
        Whether the rebuild runs as tasks (:mod:`scrollzarr.tasks`): on a Dask cluster, or resuming such a
        rebuild here; each level's tasks are its ``blocks``.
    scheduler : str or None
        The Dask scheduler (``--scheduler``), for the plan's text.
    """

    output: Path
    first: int
    shapes: tuple[Shape3, ...]
    dtype: np.dtype
    layout: StoreLayout
    origin: Shape3 | None
    algorithm: ds.Algorithm
    need: int
    blocks: tuple[Shape3, ...]
    workers: int
    quiet: bool
    fingerprint: dict[str, Any]
    resume_from: Progress | None
    tasks: bool = False
    scheduler: str | None = None


def plan_rebuild(
    output: Path, first: int, options: Options, chunk_size: int | None, slots: int = 1, parallel: int = 1
) -> RebuildPlan:
    """Check an existing OME-Zarr and work out the levels ``first … nlevels-1`` to rebuild.

    Parameters
    ----------
    chunk_size : int or None
        Chunk edge of the new levels; ``None`` keeps that of level ``first - 1``.
    slots : int
        Tasks a worker process runs at once on a Dask cluster: each has that share of ``--max_gb``.
    parallel : int
        Tasks the cluster runs at once: each level is cut into at least as many tasks where it can be.
    """
    check_output_name(output)
    if options.zarr_only:
        raise UsageError("--first_new_level adds levels to an OME-Zarr; it cannot be combined with --zarr_only")
    if first < 1:
        raise UsageError(f"--first_new_level must be 1 or more (level 0 comes from the TIFFs), not {first}")
    if first >= options.nlevels:
        raise UsageError(
            f"--first_new_level {first} leaves nothing to build with --nlevels {options.nlevels}; "
            f"raise --nlevels above {first}"
        )
    record = _existing_rebuild(output, options.resume)
    tasks = options.scheduler is not None or (record is not None and record.tasks)
    if record is not None and options.scheduler is not None and not record.tasks:
        raise UsageError(
            f"cannot resume {output} on a Dask cluster: the rebuild was started without --scheduler; "
            "resume it without --scheduler (and without DASK_SCHEDULER_ADDRESS set)"
        )
    asked = {"rebuild_from_level": first, "nlevels": options.nlevels, "algorithm": options.algorithm}
    _check_resumable(output, record, asked)
    try:
        group = zarr.open_group(str(output), mode="r")  # zarr format 2 or 3, whichever the store is
        multiscales = ngff.removed(group.attrs.asdict()) if record is None else _recorded(record)
        multiscale = ngff.read(multiscales)
    except ngff.MetadataError as error:
        raise ScrollzarrError(
            f"{output} is not a finished OME-Zarr ({error}); convert the TIFFs first, without --first_new_level"
        ) from None
    except Exception:  # zarr raises many kinds for a directory that is not a group
        raise ScrollzarrError(
            f"{output} is not a finished OME-Zarr (no readable multiscales metadata); "
            "convert the TIFFs first, without --first_new_level"
        ) from None
    paths = [dataset.path for dataset in multiscale.datasets]
    if paths != [str(level) for level in range(len(paths))]:
        raise ScrollzarrError(f"{output} has levels {paths}, not 0, 1, 2, …; it was not written by scroll_to_ome")
    if first > len(paths):
        raise UsageError(
            f"--first_new_level {first} needs level {first - 1}, but {output} has levels 0 to {len(paths) - 1}; "
            f"use --first_new_level {len(paths)} or less"
        )
    source = _level(output, group, first - 1)
    arrays = _new_layout(output, first, source, chunk_size)
    chunk = arrays.chunk
    source_shape = shape3(source.shape)
    base = ds.level_shapes(source_shape, options.nlevels - first + 1)
    shapes = tuple(shape3(_level(output, group, level).shape) for level in range(first)) + base[1:]
    translation = multiscale.datasets[0].translation
    dtype = np.dtype(source.dtype)
    model = memory.Layout(
        shapes=shapes,
        chunk=chunk,
        in_itemsize=dtype.itemsize,
        out_itemsize=dtype.itemsize,
        slice_shape=source_shape[1:],
        decode_bytes=0,
        algorithm=options.algorithm,
        workers=options.worker_count,
        unit=arrays.shard,
        encoded=arrays.compressor != "none",
    )
    plane = arrays.unit[0] * source.shape[1] * source.shape[2] * dtype.itemsize
    if options.max_gb is None:
        budget = max(plane, memory.read_back_need(model, first))
    else:
        budget = round(options.max_gb * memory.GIB) // (slots if tasks else 1)
    blocks = memory.read_back_blocks(model, first, budget)
    if tasks:
        blocks = tuple(
            memory.split_for(shapes[level], block, arrays.unit, parallel)
            for level, block in enumerate(blocks, start=first)
        )
    if record is not None and record.tasks:
        blocks = memory.recorded_blocks(blocks, record.blocks)
    fingerprint = {
        "rebuild_from_level": first,
        "nlevels": options.nlevels,
        "chunk_size": chunk,
        "algorithm": options.algorithm,
        "multiscales": multiscales,
    }
    _check_resumable(output, record, fingerprint)
    return RebuildPlan(
        output=output,
        first=first,
        shapes=shapes,
        dtype=dtype,
        layout=arrays,
        origin=None if translation is None else (int(translation[0]), int(translation[1]), int(translation[2])),
        algorithm=options.algorithm,
        need=memory.read_back_cost(model, first, blocks),
        blocks=blocks,
        workers=options.worker_count,
        quiet=options.quiet,
        fingerprint=fingerprint,
        resume_from=record,
        tasks=tasks,
        scheduler=options.scheduler,
    )


def _recorded(record: Progress) -> dict[str, Any]:
    """The metadata a stopped rebuild removed, from its record: the removed attributes, or (a record of
    scrollzarr 0.1) the bare 0.4 ``multiscales`` list."""
    removed = record.fingerprint["multiscales"]
    return {"multiscales": removed} if isinstance(removed, list) else removed


def _level(output: Path, group: zarr.Group, level: int) -> zarr.Array:
    """Level ``level`` of the store, opened; one clear error if it is missing or cannot be opened."""
    try:
        array = group[str(level)]
    except Exception as error:  # missing, or metadata zarr cannot parse (an unknown codec, say)
        raise ScrollzarrError(
            f"{output}: level {level} cannot be opened ({type(error).__name__}: {error}); convert the TIFFs again"
        ) from None
    if not isinstance(array, zarr.Array):
        raise ScrollzarrError(f"{output}: level {level} is a group, not an array; it was not written by scroll_to_ome")
    return array


def _new_layout(output: Path, first: int, source: zarr.Array, chunk_size: int | None) -> StoreLayout:
    """The layout of the new levels: that of level ``first - 1`` (``source``), with ``chunk_size`` if given."""
    try:
        layout = layout_of(source)
    except UnsupportedLayout as error:
        raise ScrollzarrError(
            f"{output}: level {first - 1} uses {error}, which scroll_to_ome does not write; "
            "convert the TIFFs again instead of --first_new_level"
        ) from None
    if chunk_size is None or chunk_size == layout.chunk:
        return layout
    if layout.shard is not None and any(n % chunk_size for n in layout.shard):
        raise UsageError(
            f"--chunk_size {chunk_size} does not divide the shards of {output} "
            f"({','.join(map(str, layout.shard))}); leave --chunk_size out, or give a divisor of each"
        )
    if layout.shard is not None and math.prod(n // chunk_size for n in layout.shard) > MAX_SHARD_CHUNKS:
        raise UsageError(
            f"--chunk_size {chunk_size} would make the shards of {output} ({','.join(map(str, layout.shard))}) "
            f"hold {math.prod(n // chunk_size for n in layout.shard):,} chunks; at most {MAX_SHARD_CHUNKS:,} per "
            "shard: give a larger --chunk_size, or leave it out"
        )
    return replace(layout, chunk=chunk_size)


def _check_resumable(output: Path, record: Progress | None, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume ``record`` with options (those of ``fingerprint``) other than the stopped rebuild's."""
    if record is None:
        return
    differs = record.mismatch(fingerprint, {key: REBUILD_OPTIONS[key] for key in fingerprint if key in REBUILD_OPTIONS})
    if differs:
        raise UsageError(f"cannot resume {output}: {differs}; resume with the options of the stopped rebuild")


def _existing_rebuild(output: Path, resume: bool) -> Progress | None:
    """The record of a stopped rebuild of ``output`` to continue (with ``resume``); checks it may be continued.

    Raises
    ------
    ScrollzarrError
        If the store is an unfinished conversion, an unfinished rebuild without
        ``resume``, or not unfinished with ``resume``.
    """
    record = progress.load(output) if is_zarr_store(output) else None
    if record is not None and "rebuild_from_level" not in record.fingerprint:
        raise ScrollzarrError(
            f"{output} is an unfinished conversion; finish it first with the same command and --resume"
        )
    if record is not None and not resume:
        raise ScrollzarrError(
            f"{output} is an unfinished rebuild (--first_new_level {record.fingerprint['rebuild_from_level']}); "
            "continue it with the same command and --resume"
        )
    if record is None and resume:
        raise ScrollzarrError(
            f"nothing to resume: {output} is not an unfinished --first_new_level rebuild; run without --resume"
        )
    return record


def rebuild_levels(plan: RebuildPlan, executor: Executor | None = None) -> Report:
    """Delete levels ``plan.first …`` of the store, build them again, and rewrite the metadata.

    Before any level is touched, the store is marked unfinished: the progress
    record (holding the old ``multiscales``) is written and the ``multiscales``
    metadata removed, durably.  With ``plan.resume_from`` the stopped rebuild
    continues: the levels whose rows the record vouches for are kept.  The
    caller holds the output's :class:`~scrollzarr.outputlock.OutputLock` from
    before planning.  A rebuild of tasks runs on ``executor`` (a Dask cluster), or, resuming a cluster's
    rebuild without one, on this machine's threads.
    """
    started = time.monotonic()
    if plan.tasks:
        executor = executor or LocalExecutor(plan.workers)
        executor.check_paths(plan.output / str(plan.first - 1) / plan.layout.metadata_names[0], plan.output)
    group = zarr.open_group(str(plan.output), mode="r+")
    log.debug("removed %d temporary files of a stopped run", remove_partial_files(plan.output))
    record = plan.resume_from
    if record is None:
        _check_source(plan)
        record = Progress(plan.fingerprint, [], tasks=plan.tasks, blocks=[list(block) for block in plan.blocks])
        if plan.tasks:
            record.run = uuid.uuid4().hex
        record.save(plan.output)
    attributes = group.attrs.asdict()
    if ngff.version(attributes) is not None:  # also resuming: a stop between the record and this left it there
        group.attrs.put(ngff.without(attributes))
        sync_file_system(plan.output)
    report = _prepare_levels(plan, group, record)
    if plan.tasks:
        assert executor is not None  # given above
        _rebuild_tasks(plan, executor, report, record.run)
    else:
        with progress_bar(plan.shapes[plan.first :], plan.quiet) as bar, Workers(plan.workers) as workers:
            build_from_above(
                group, plan.output, plan.layout, plan.first, plan.blocks, plan.algorithm, workers, bar, report,
                record, lambda: record.save(plan.output), _advice(plan.first - 1),
            )  # fmt: skip
    multiscale = Multiscale.pyramid(
        plan.output.stem,
        len(plan.shapes),
        plan.origin,
        plan.algorithm,
        ds.parameters(plan.algorithm),
    )
    group.attrs.update(ngff.attributes(multiscale, group.metadata.zarr_format, group.attrs.asdict()))
    progress.remove(plan.output)
    report.seconds = time.monotonic() - started
    return report


def _level_tasks(plan: RebuildPlan) -> dict[int, list[Task]]:
    return {
        level: level_tasks(plan.shapes[level], plan.blocks[level - plan.first], level)
        for level in range(plan.first, len(plan.shapes))
    }


def _level_specs(plan: RebuildPlan) -> tuple[SinkSpec, ...]:
    """Every level's spec (the levels kept: only their directory is read, by the tasks of the level below)."""
    return tuple(
        SinkSpec(plan.output / str(level), plan.shapes[level], str(plan.dtype), plan.layout)
        for level in range(len(plan.shapes))
    )


def _rebuild_tasks(plan: RebuildPlan, executor: Executor, report: Report, run: str) -> None:
    """Build the new levels as tasks of run ``run`` on ``executor``, a level at a time; the tasks finished
    before (marked in the store) are not run again."""
    put_fence(plan.output, run)  # its tasks write while it is there
    job = Job(
        output=plan.output,
        run=run,
        levels=_level_specs(plan),
        algorithm=plan.algorithm,
        source=None,
        threads=executor.threads,
        advice=_advice(plan.first - 1),
        first_read=plan.first - 1,
    )
    with progress_bar(plan.shapes[plan.first :], plan.quiet) as bar:
        totals = run_levels(executor, job, _level_tasks(plan), bar)
    for level, total in totals.items():
        report.levels[level].chunks_written = total.chunks
    remove_markers(plan.output)


def _check_source(plan: RebuildPlan) -> None:
    """Refuse, before the store is marked unfinished, a level to read whose unit files show damage (their
    sizes, shard indexes, compressed framing: a few bytes a file), so that a damaged finished store stays
    finished and readable rather than become an unfinished rebuild that cannot be finished."""
    level = plan.first - 1
    damaged = damaged_units(
        SinkSpec(plan.output / str(level), plan.shapes[level], str(plan.dtype), _source_layout(plan))
    )
    if damaged:
        path, problem = damaged[0]
        raise DamagedChunkError(f"chunk file {path} is damaged ({problem}); {_advice(level)}")


def _source_layout(plan: RebuildPlan) -> StoreLayout:
    """The layout of the level the rebuild reads (the new levels' own, but for a --chunk_size given)."""
    source = zarr.open_array(str(plan.output / str(plan.first - 1)), mode="r")
    return layout_of(source)


def _advice(level: int) -> str:
    """What to do about a damaged chunk of ``level``, the old level the rebuild reads (the levels it builds
    are rid of damaged chunks before they are read: :func:`_prepare_levels`)."""
    again = f" or rebuild it from level {level - 1} with --first_new_level {level}" if level else ""
    return f"this rebuild reads level {level}: convert the TIFFs again with --overwrite{again}"


def _prepare_levels(plan: RebuildPlan, group: zarr.Group, record: Progress) -> Report:
    """Delete the levels from ``plan.first`` on that the record does not vouch for, and create the planned ones.

    A level with recorded rows was created by this rebuild (its old version was
    deleted before any row was recorded): it is kept, the chunks beyond the
    record are written again.  Any other level may still hold old chunks, so
    it goes, chunks and all.
    """
    for path in sorted(plan.output.iterdir()):
        ours = path.is_dir() and path.name.isdigit() and int(path.name) >= plan.first
        # a level this rebuild has written part of: rows recorded, or (tasks) a task marked finished
        written = (
            has_markers(plan.output, record.run, int(path.name))
            if record.tasks and ours
            else record.rows_done.get(path.name)
        )
        if ours and not written:
            shutil.rmtree(path)
    chunk = plan.layout.chunk
    report = Report(plan.output, plan.dtype, plan.layout)
    damaged = []
    tasks = _level_tasks(plan) if record.tasks else {}  # once, not for every level
    for level in range(plan.first, len(plan.shapes)):
        metadata = [plan.output / str(level) / name for name in plan.layout.metadata_names]
        if not all(readable_metadata(path) for path in metadata):  # missing, or empty after a power cut
            for path in metadata:
                path.unlink(missing_ok=True)
            plan.layout.create_array(group, str(level), plan.shapes[level], plan.dtype, overwrite=False)
        report.levels[level] = LevelReport(plan.shapes[level], chunk_count(plan.shapes[level], chunk))
        spec = SinkSpec(plan.output / str(level), plan.shapes[level], str(plan.dtype), plan.layout)
        if record.tasks:
            unmark_damaged(plan.output, record.run, level, spec, tasks[level])
            continue
        for path, problem in damaged_units(spec):
            log.warning("chunk file %s is damaged (%s); it is written again", path, problem)
            row = unit_index(spec, path)[0] * plan.layout.unit[0] // plan.blocks[level - plan.first][0]
            record.rows_done[str(level)] = min(record.rows_done.get(str(level), 0), row)
            damaged.append(path)
    record.forget(plan.output, damaged)
    return report


def describe_rebuild(plan: RebuildPlan) -> str:
    """The ``--first_new_level`` plan as text, for ``--dry_run``."""
    lines = [
        f"rebuild levels {plan.first} to {len(plan.shapes) - 1} of {plan.output} from level {plan.first - 1}",
        f"  new levels: {plan.layout.describe()} (the layout of level {plan.first - 1})",
    ]
    for level in range(plan.first, len(plan.shapes)):
        shape = plan.shapes[level]
        lines.append(
            f"  level {level}: {shape[0]} x {shape[1]} x {shape[2]} (z, y, x), "
            f"{chunk_count(shape, plan.layout.chunk)} chunks of {plan.layout.chunk}^3, {plan.algorithm}"
        )
    if plan.tasks:
        where = f"on the Dask cluster at {plan.scheduler}" if plan.scheduler else "on this machine"
        counts = {level: len(tasks) for level, tasks in _level_tasks(plan).items()}
        lines.append(
            f"tasks, {where}: {sum(counts.values())} in all, {plan.workers} thread(s) each, "
            f"about {format_bytes(plan.need)} each for buffers"
        )
        lines += [
            f"  level {level}: {count} task(s) from the stored level {level - 1}" for level, count in counts.items()
        ]
    else:
        lines.append(f"memory: about {format_bytes(plan.need)} for buffers, {plan.workers} worker(s)")
    return "\n".join(lines)
