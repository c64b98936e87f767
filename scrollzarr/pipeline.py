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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from scrollzarr import downsample as ds
from scrollzarr import memory
from scrollzarr.blocks import Box, Shape3, box_size, iter_boxes
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.memory import format_bytes
from scrollzarr.ngff_v04 import Multiscale
from scrollzarr.ranges import parse_ranges
from scrollzarr.store import ChunkWriter, check_output_name, check_replaceable, create_level, remove_existing
from scrollzarr.streaming import LevelStream
from scrollzarr.tiffstack import TiffStack, numbered_tiffs, open_stack, prefetch, read_rows
from scrollzarr.workers import Workers, available_cores

log = logging.getLogger(__name__)


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

    @property
    def worker_count(self) -> int:
        return self.workers or available_cores()


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
        return "\n".join(lines)


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
    missing : list of int
        Slice numbers inside the converted z range without a file (written as zeros).
    bands : memory.BandPlan
        How level 0 is cut, and how many levels are streamed with it.
    blocks : tuple of (int, int, int)
        Blocks of the levels built from the stored level above (after the streamed ones).
    need : int
        Bytes the buffers use at the most, by :mod:`scrollzarr.memory`'s model.
    """

    input_dir: Path
    output: Path
    options: Options
    stack: TiffStack
    origin: Shape3
    cropped: bool
    shapes: tuple[Shape3, ...]
    dtype: np.dtype
    missing: list[int]
    bands: memory.BandPlan
    blocks: tuple[Shape3, ...]
    need: int


def _format_numbers(numbers: list[int]) -> str:
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


def level_shapes(shape: Shape3, nlevels: int) -> tuple[Shape3, ...]:
    """Shapes of ``nlevels`` levels, each ``ceil(n / 2)`` of the previous along every axis."""
    shapes = [shape]
    for _ in range(nlevels - 1):
        shapes.append(ds.halved_shape(shapes[-1]))  # type: ignore[arg-type]
    return tuple(shapes)


def plan_conversion(input_dir: Path, output: Path, options: Options) -> Plan:
    """Discover the stack, check every header and work out shapes, bands, blocks and memory.

    Raises
    ------
    ScrollzarrError
        For any problem with the input, the output path or the options.
    """
    check_output_name(output)
    check_replaceable(output, options.overwrite, input_dir)
    z_range, y_range, x_range = parse_ranges(options.ranges)
    files = numbered_tiffs(input_dir)
    z0, z1 = z_range.resolve(max(files) + 1)
    stack = open_stack({z: path for z, path in files.items() if z0 <= z < z1})
    y0, y1 = y_range.resolve(stack.shape[0])
    x0, x1 = x_range.resolve(stack.shape[1])
    if options.obytes == 1 and stack.dtype not in (np.uint8, np.uint16):
        raise UsageError(f"--obytes 1 converts uint16 to uint8, but the slices are {stack.dtype}; leave it out")
    out_dtype = np.dtype(np.uint8) if options.obytes == 1 else stack.dtype
    shapes = level_shapes((z1 - z0, y1 - y0, x1 - x0), 1 if options.zarr_only else options.nlevels)
    layout = memory.Layout(
        shapes=shapes,
        chunk=options.chunk_size,
        in_itemsize=stack.dtype.itemsize,
        out_itemsize=out_dtype.itemsize,
        slice_shape=stack.shape,
        decode_bytes=stack.decode_bytes,
        algorithm=options.algorithm,
        workers=options.worker_count,
    )
    limit = None if options.max_gb is None else int(options.max_gb * memory.GIB)
    bands = memory.plan_bands(layout, limit)
    first_read_back = bands.streamed + 1
    budget = limit if limit is not None else max(bands.nbytes, memory.read_back_need(layout, first_read_back))
    blocks = memory.read_back_blocks(layout, first_read_back, budget)
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
        missing=stack.missing(max(z0, min(stack.slices)), z1),
        bands=bands,
        blocks=blocks,
        need=need,
    )


def _chunk_count(shape: Shape3, chunk: int) -> int:
    count = 1
    for n in shape:
        count *= -(-n // chunk)
    return count


def _describe_levels(shapes: Iterable[Shape3], first: int, chunk: int, itemsize: int) -> tuple[list[str], int]:
    lines, total = [], 0
    for level, shape in enumerate(shapes, start=first):
        count = _chunk_count(shape, chunk)
        total += count
        lines.append(f"  level {level}: {shape[0]} x {shape[1]} x {shape[2]} (z, y, x), {count} chunks")
    lines.append(
        f"  {total} chunks, at most {format_bytes(total * chunk**3 * itemsize)} (all-zero chunks are not written)"
    )
    return lines, total


def describe_plan(plan: Plan) -> str:
    """The plan as text, for ``--dry_run``."""
    stack, chunk = plan.stack, plan.options.chunk_size
    (z0, y0, x0), (nz, ny, nx) = plan.origin, plan.shapes[0]
    slices = sorted(stack.slices)
    kind = "plain zarr array" if plan.options.zarr_only else "OME-Zarr, NGFF 0.4"
    lines = [
        f"input: {plan.input_dir}",
        f"  {len(slices)} slice files, numbers {slices[0]} to {slices[-1]}, "
        f"each {stack.shape[0]} x {stack.shape[1]} (rows x columns) {stack.dtype}",
        f"  missing slices (written as zeros): {_format_numbers(plan.missing) or 'none'}",
        f"  converting x {x0}:{x0 + nx}, y {y0}:{y0 + ny}, z {z0}:{z0 + nz}",
        f"output: {plan.output} ({kind}), {plan.dtype}, chunks {chunk}^3, downsampling {plan.options.algorithm}",
    ]
    lines += _describe_levels(plan.shapes, 0, chunk, plan.dtype.itemsize)[0]
    lines.append(
        f"memory: about {format_bytes(plan.need)} for buffers, {plan.options.worker_count} worker(s); "
        f"level 0 read in bands of {plan.bands.rows} x {plan.bands.cols} (rows x columns)"
    )
    lines.append("  " + _describe_passes(plan.bands.streamed, len(plan.shapes) - 1))
    return "\n".join(lines)


def _levels_text(first: int, last: int) -> str:
    return f"level {first}" if first == last else f"levels {first} to {last}"


def _describe_passes(streamed: int, last: int) -> str:
    text = f"{_levels_text(0, streamed)} built in one pass over the TIFFs"
    if streamed < last:
        text += f"; {_levels_text(streamed + 1, last)} from the stored level above each"
    return text


def _read_tasks(
    plan: Plan, view: np.ndarray, z: int, band: tuple[tuple[int, int], tuple[int, int]]
) -> list[Callable[[], None]]:
    """Tasks that read planes ``z … z + len(view)`` of ``band`` from the TIFFs into ``view``."""
    (r0, r1), (c0, c1) = band
    oz, oy, ox = plan.origin
    rows, cols = (oy + r0, oy + r1), (ox + c0, ox + c1)
    convert = plan.dtype != plan.stack.dtype

    def read(index: int) -> None:
        if convert:
            planes = np.empty(view.shape[1:], plan.stack.dtype)
            read_rows(plan.stack, oz + z + index, rows, cols, planes)
            view[index] = ds.to_uint8(planes)
        else:
            read_rows(plan.stack, oz + z + index, rows, cols, view[index])

    return [lambda index=index: read(index) for index in range(len(view))]


def _convert_band(
    plan: Plan,
    writers: list[ChunkWriter],
    band: tuple[tuple[int, int], tuple[int, int]],
    workers: Workers,
    progress: tqdm,
    report: Report,
) -> None:
    """Read one band of level 0 from the TIFFs and stream it through the streamed levels."""
    chunk, streamed = plan.options.chunk_size, plan.bands.streamed
    streams: list[LevelStream] = []
    below = None
    for level in range(streamed, -1, -1):
        scale = 2**level
        rows, cols = ((math.ceil(a / scale), math.ceil(b / scale)) for a, b in band)
        below = LevelStream(
            plan.shapes[level][0], rows, cols, plan.dtype, chunk, plan.options.algorithm,
            writers[level], below, workers, progress.update,
        )  # fmt: skip
        streams.insert(0, below)
    top, depth = streams[0], plan.shapes[0][0]
    oz, oy, _ = plan.origin
    rows = (oy + band[0][0], oy + band[0][1])
    for z in range(0, depth, chunk):
        # the files of this slab (the first time) and the next come into the cache while this one is processed
        ahead = range(oz + (z + chunk if z else 0), oz + min(z + 2 * chunk, depth))
        reader = threading.Thread(target=prefetch, args=(plan.stack, ahead, rows), daemon=True)
        reader.start()
        view = top.reserve(min(chunk, depth - z))
        workers.run(_read_tasks(plan, view, z, band))
        top.commit(len(view))
        reader.join()
    for level, stream in enumerate(streams):
        report.levels[level].chunks_written += stream.chunks_written


def write_downsampled_block(source: zarr.Array, writer: ChunkWriter, box: Box, algorithm: ds.Algorithm) -> int:
    """Build ``box`` of a level from the stored level above, ``source``; write its non-zero chunks."""
    margin = ds.halo(algorithm)
    read = tuple(
        slice(max(2 * a - margin, 0), min(2 * b + margin, n)) for (a, b), n in zip(box, source.shape, strict=True)
    )
    data = source[read]
    if algorithm == "gaussian":
        core = tuple(
            slice(2 * a - r.start, min(2 * b, n) - r.start)
            for (a, b), r, n in zip(box, read, source.shape, strict=True)
        )
        result = ds.downsample_gaussian(data, core)  # type: ignore[arg-type]
    else:
        result = ds.downsample(data, algorithm)
    corner = tuple(a for a, _ in box)
    written = 0
    for local in iter_boxes(result.shape, writer.chunks):  # type: ignore[arg-type]
        piece = result[tuple(slice(a, b) for a, b in local)]
        written += writer.write(tuple(c + a for c, (a, _) in zip(corner, local, strict=True)), piece)
    return written


def _progress(shapes: Iterable[Shape3], quiet: bool) -> tqdm:
    total = sum(s[0] * s[1] * s[2] for s in shapes)
    return tqdm(total=total, unit="vox", unit_scale=True, disable=quiet, mininterval=1.0, desc="converting")


def _build_from_above(
    group: zarr.Group,
    first: int,
    blocks: tuple[Shape3, ...],
    algorithm: ds.Algorithm,
    workers: Workers,
    progress: tqdm,
    report: Report,
) -> None:
    """Fill levels ``first …`` (already created) from the stored level above each, in ``blocks``."""
    for level, block in enumerate(blocks, start=first):
        source, target = group[str(level - 1)], group[str(level)]
        assert isinstance(source, zarr.Array) and isinstance(target, zarr.Array)
        writer = ChunkWriter(target)
        log.debug(
            "level %d: from level %d in blocks of %s voxels (z, y, x)", level, level - 1, " x ".join(map(str, block))
        )
        progress.set_description(f"level {level}")

        def work(box: Box, source: zarr.Array = source, writer: ChunkWriter = writer) -> int:
            written = write_downsampled_block(source, writer, box, algorithm)
            progress.update(box_size(box))
            return written

        boxes = list(iter_boxes(target.shape, block))  # type: ignore[arg-type]
        report.levels[level].chunks_written += sum(workers.run(lambda box=box: work(box) for box in boxes))


def _stack_attributes(plan: Plan) -> dict[str, object]:
    return {
        "source_directory": str(plan.input_dir.resolve()),
        "origin_zyx": list(plan.origin),
        "missing_slices": plan.missing,
        "obytes": plan.options.obytes,
    }


def _downsampling_parameters(algorithm: ds.Algorithm) -> dict[str, object]:
    if algorithm == "gaussian":
        return {"sigma": ds.GAUSSIAN_SIGMA, "truncate": ds.GAUSSIAN_TRUNCATE}
    return {}


def convert(plan: Plan) -> Report:
    """Carry out ``plan``: write the store, metadata last.

    Returns
    -------
    Report
        Chunks written per level and the time taken.
    """
    started = time.monotonic()
    options, chunk = plan.options, plan.options.chunk_size
    if plan.missing:
        log.warning("no file for slice(s) %s; they are written as zeros", _format_numbers(plan.missing))
    remove_existing(plan.output)
    report = Report(plan.output, plan.dtype, chunk)
    for level, shape in enumerate(plan.shapes):
        report.levels[level] = LevelReport(shape, _chunk_count(shape, chunk))
    group = None
    if options.zarr_only:
        arrays = [create_level(plan.output, None, plan.shapes[0], chunk, plan.dtype)]
    else:
        group = zarr.open_group(str(plan.output), mode="w", zarr_format=2)
        arrays = [create_level(group, str(level), shape, chunk, plan.dtype) for level, shape in enumerate(plan.shapes)]
    writers = [ChunkWriter(array) for array in arrays]
    _, height, width = plan.shapes[0]
    log.debug(
        "level 0: bands of %d x %d (rows x columns), levels 1 to %d streamed",
        plan.bands.rows, plan.bands.cols, plan.bands.streamed,
    )  # fmt: skip
    with _progress(plan.shapes, options.quiet) as progress, Workers(options.worker_count) as workers:
        progress.set_description(f"levels 0-{plan.bands.streamed}" if plan.bands.streamed else "level 0")
        for (r0, r1), (c0, c1) in _bands(height, width, plan.bands):
            _convert_band(plan, writers, ((r0, r1), (c0, c1)), workers, progress, report)
        if group is not None:
            _build_from_above(group, plan.bands.streamed + 1, plan.blocks, options.algorithm, workers, progress, report)
    attributes = _stack_attributes(plan)
    if group is None:
        arrays[0].attrs["scrollzarr"] = attributes
    else:
        multiscale = Multiscale.pyramid(
            plan.output.stem,
            len(plan.shapes),
            plan.origin if plan.cropped else None,
            options.algorithm,
            _downsampling_parameters(options.algorithm),
        )
        group.attrs.update({"scrollzarr": attributes, "multiscales": [multiscale.to_json()]})
    report.seconds = time.monotonic() - started
    return report


def _bands(height: int, width: int, bands: memory.BandPlan) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    return [
        ((r, min(r + bands.rows, height)), (c, min(c + bands.cols, width)))
        for r in range(0, height, bands.rows)
        for c in range(0, width, bands.cols)
    ]


@dataclass(frozen=True)
class RebuildPlan:
    """``--first_new_level``: levels to rebuild in an existing OME-Zarr."""

    output: Path
    first: int
    shapes: tuple[Shape3, ...]
    dtype: np.dtype
    chunk: int
    origin: Shape3 | None
    algorithm: ds.Algorithm
    budget: int
    blocks: tuple[Shape3, ...]
    workers: int
    quiet: bool


def plan_rebuild(output: Path, first: int, options: Options, chunk_size: int | None) -> RebuildPlan:
    """Check an existing OME-Zarr and work out the levels ``first … nlevels-1`` to rebuild.

    Parameters
    ----------
    chunk_size : int or None
        Chunk edge of the new levels; ``None`` keeps that of level ``first - 1``.
    """
    check_output_name(output)
    if options.zarr_only:
        raise UsageError("--first_new_level adds levels to an OME-Zarr; it cannot be combined with --zarr_only")
    if options.obytes:
        raise UsageError("--obytes applies when converting TIFFs; new levels keep the dtype of the level above")
    if first < 1:
        raise UsageError(f"--first_new_level must be 1 or more (level 0 comes from the TIFFs), not {first}")
    if first >= options.nlevels:
        raise UsageError(
            f"--first_new_level {first} leaves nothing to build with --nlevels {options.nlevels}; "
            f"raise --nlevels above {first}"
        )
    try:
        group = zarr.open_group(str(output), mode="r")
        multiscale = Multiscale.from_json(group.attrs["multiscales"][0])  # type: ignore[index,arg-type]
    except Exception:
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
    source = group[str(first - 1)]
    assert isinstance(source, zarr.Array)
    chunk = source.chunks[0] if chunk_size is None else chunk_size
    base = level_shapes(source.shape, options.nlevels - first + 1)  # type: ignore[arg-type]
    shapes = tuple(group[str(level)].shape for level in range(first)) + base[1:]
    translation = multiscale.datasets[0].translation
    dtype = np.dtype(source.dtype)
    layout = memory.Layout(
        shapes=shapes,
        chunk=chunk,
        in_itemsize=dtype.itemsize,
        out_itemsize=dtype.itemsize,
        slice_shape=source.shape[1:],  # type: ignore[arg-type]
        decode_bytes=0,
        algorithm=options.algorithm,
        workers=options.worker_count,
    )
    plane = chunk * source.shape[1] * source.shape[2] * dtype.itemsize
    if options.max_gb is None:
        budget = max(plane, memory.read_back_need(layout, first))
    else:
        budget = int(options.max_gb * memory.GIB)
    return RebuildPlan(
        output=output,
        first=first,
        shapes=shapes,
        dtype=dtype,
        chunk=chunk,
        origin=None if translation is None else tuple(int(v) for v in translation),  # type: ignore[arg-type]
        algorithm=options.algorithm,
        budget=budget,
        blocks=memory.read_back_blocks(layout, first, budget),
        workers=options.worker_count,
        quiet=options.quiet,
    )


def rebuild_levels(plan: RebuildPlan) -> Report:
    """Delete levels ``plan.first …`` of the store, build them again, and rewrite the metadata."""
    started = time.monotonic()
    group = zarr.open_group(str(plan.output), mode="r+")
    for name in list(group.array_keys()):
        if name.isdigit() and int(name) >= plan.first:
            del group[name]
    report = Report(plan.output, plan.dtype, plan.chunk)
    for level in range(plan.first, len(plan.shapes)):
        create_level(group, str(level), plan.shapes[level], plan.chunk, plan.dtype)
        report.levels[level] = LevelReport(plan.shapes[level], _chunk_count(plan.shapes[level], plan.chunk))
    with _progress(plan.shapes[plan.first :], plan.quiet) as progress, Workers(plan.workers) as workers:
        _build_from_above(group, plan.first, plan.blocks, plan.algorithm, workers, progress, report)
    multiscale = Multiscale.pyramid(
        plan.output.stem,
        len(plan.shapes),
        plan.origin,
        plan.algorithm,
        _downsampling_parameters(plan.algorithm),
    )
    group.attrs["multiscales"] = [multiscale.to_json()]
    report.seconds = time.monotonic() - started
    return report


def describe_rebuild(plan: RebuildPlan) -> str:
    """The ``--first_new_level`` plan as text, for ``--dry_run``."""
    lines = [f"rebuild levels {plan.first} to {len(plan.shapes) - 1} of {plan.output} from level {plan.first - 1}"]
    for level in range(plan.first, len(plan.shapes)):
        shape = plan.shapes[level]
        lines.append(
            f"  level {level}: {shape[0]} x {shape[1]} x {shape[2]} (z, y, x), "
            f"{_chunk_count(shape, plan.chunk)} chunks of {plan.chunk}^3, {plan.algorithm}"
        )
    lines.append(f"memory: about {format_bytes(plan.budget)} for buffers, {plan.workers} worker(s)")
    return "\n".join(lines)


def run(
    input_dir: Path,
    output: Path,
    options: Options,
    first_new_level: int | None = None,
    chunk_size: int | None = None,
    dry_run: bool = False,
) -> None:
    """Everything ``scroll_to_ome`` does: plan, then print the plan or carry it out.

    Parameters
    ----------
    first_new_level : int or None
        Rebuild levels from this one on in the existing store ``output``
        instead of converting ``input_dir``.
    chunk_size : int or None
        The chunk size the user gave, if any (a rebuild otherwise keeps the store's).
    dry_run : bool
        Print the plan on stdout and write nothing.
    """
    if first_new_level is not None:
        rebuild = plan_rebuild(output, first_new_level, options, chunk_size)
        if dry_run:
            print(describe_rebuild(rebuild))
        else:
            log.info(rebuild_levels(rebuild).summary())
        return
    plan = plan_conversion(input_dir, output, options)
    if dry_run:
        print(describe_plan(plan))
    else:
        log.info(convert(plan).summary())
