"""The conversion: a TIFF stack becomes a multi-resolution OME-Zarr (or one plain zarr array).

Level 0 is written in chunk-aligned blocks read straight from the TIFFs (only
the rows a block needs); each lower level is then built, block by block, from
the stored level above.  Blocks are independent units, sized to the memory
budget.  The ``multiscales`` metadata is written last, so a store without it
is unfinished.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from scrollzarr import downsample as ds
from scrollzarr.blocks import Box, Shape3, box_size, choose_block, iter_boxes
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.ngff_v04 import Multiscale
from scrollzarr.ranges import parse_ranges
from scrollzarr.store import (
    check_output_name,
    check_replaceable,
    create_level,
    remove_existing,
)
from scrollzarr.tiffstack import TiffStack, numbered_tiffs, open_stack, read_rows

log = logging.getLogger(__name__)

GIB = 2**30


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
                f"  level {index}: {z} x {y} x {x} (z, y, x), "
                f"{level.chunks_written} of {level.chunks_total} chunks written, "
                f"{level.chunks_total - level.chunks_written} all-zero chunks skipped"
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
    blocks : tuple of (int, int, int)
        Block of each level, z, y, x: the voxels written at a time (for level 0,
        read from the TIFFs at a time).
    budget : int
        Bytes the buffers may use.
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
    blocks: tuple[Shape3, ...]
    budget: int


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


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, as ``--max_gb`` counts them."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def level_shapes(shape: Shape3, nlevels: int) -> tuple[Shape3, ...]:
    """Shapes of ``nlevels`` levels, each ``ceil(n / 2)`` of the previous along every axis."""
    shapes = [shape]
    for _ in range(nlevels - 1):
        shapes.append(ds.halved_shape(shapes[-1]))  # type: ignore[arg-type]
    return tuple(shapes)


def _level0_cost(stack: TiffStack, out_dtype: np.dtype, chunk: int) -> Callable[[Shape3], int]:
    """Bytes needed to convert one level-0 block: the block, its output copy, one decode buffer."""
    decoded_whole = any(entry.data_offset is None for entry in stack.slices.values())

    def cost(block: Shape3) -> int:
        voxels = block[0] * block[1] * block[2]
        size = voxels * stack.dtype.itemsize
        if out_dtype != stack.dtype:
            size += voxels * out_dtype.itemsize
        if decoded_whole:
            size += stack.slice_bytes
        elif block[2] < stack.shape[1]:
            size += block[1] * stack.shape[1] * stack.dtype.itemsize
        return size + chunk**3 * out_dtype.itemsize

    return cost


def _downsample_cost(source_shape: Shape3, dtype: np.dtype, algorithm: ds.Algorithm) -> Callable[[Shape3], int]:
    """Bytes needed to build one block of a level from the stored level above."""
    margin = ds.halo(algorithm)
    per_voxel = 2 * dtype.itemsize + {"mean": 2, "gaussian": 24}.get(algorithm, 0)

    def cost(block: Shape3) -> int:
        voxels = 1
        for n, limit in zip(block, source_shape, strict=True):
            voxels *= min(2 * n + 2 * margin, limit)
        return voxels * per_voxel

    return cost


def _budget(options: Options, plane: int, shapes: tuple[Shape3, ...], dtype: np.dtype, chunk: int) -> int:
    """Bytes the buffers may use: ``--max_gb``, or else what the run needs.

    What it needs is ``plane`` (one chunk row of whole planes of level 0) or
    the smallest block of any lower level, whichever is larger.
    """
    if options.max_gb is not None:
        return int(options.max_gb * GIB)
    smallest = (chunk, chunk, chunk)
    lower = [_downsample_cost(source, dtype, options.algorithm)(smallest) for source in shapes[:-1]]
    return max([plane, *lower])


def _lower_blocks(
    shapes: tuple[Shape3, ...], dtype: np.dtype, chunk: int, algorithm: ds.Algorithm, budget: int
) -> list[Shape3]:
    """Blocks of levels 1 … built from the level above each, within ``budget``."""
    return [
        choose_block(target, chunk, _downsample_cost(source, dtype, algorithm), budget)
        for source, target in itertools.pairwise(shapes)
    ]


def plan_conversion(input_dir: Path, output: Path, options: Options) -> Plan:
    """Discover the stack, check every header and work out shapes, blocks and memory.

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
    shape = (z1 - z0, y1 - y0, x1 - x0)
    chunk = options.chunk_size
    cost = _level0_cost(stack, out_dtype, chunk)
    shapes = level_shapes(shape, 1 if options.zarr_only else options.nlevels)
    budget = _budget(options, cost((min(chunk, shape[0]), shape[1], shape[2])), shapes, out_dtype, chunk)
    first = min(stack.slices)
    missing = stack.missing(max(z0, first), z1)
    return Plan(
        input_dir=input_dir,
        output=output,
        options=options,
        stack=stack,
        origin=(z0, y0, x0),
        cropped=options.ranges is not None and options.ranges.strip() != "",
        shapes=shapes,
        dtype=out_dtype,
        missing=missing,
        blocks=(
            choose_block(shape, chunk, cost, budget),
            *_lower_blocks(shapes, out_dtype, chunk, options.algorithm, budget),
        ),
        budget=budget,
    )


def _chunk_count(shape: Shape3, chunk: int) -> int:
    count = 1
    for n in shape:
        count *= -(-n // chunk)
    return count


def describe_plan(plan: Plan) -> str:
    """The plan as text, for ``--dry_run``."""
    stack, chunk = plan.stack, plan.options.chunk_size
    (z0, y0, x0), (nz, ny, nx) = plan.origin, plan.shapes[0]
    slices = sorted(stack.slices)
    lines = [
        f"input: {plan.input_dir}",
        f"  {len(slices)} slice files, numbers {slices[0]} to {slices[-1]}, each {stack.shape[0]} x "
        f"{stack.shape[1]} (rows x columns) {stack.dtype}",
        f"  missing slices (written as zeros): {_format_numbers(plan.missing) or 'none'}",
        f"  converting x {x0}:{x0 + nx}, y {y0}:{y0 + ny}, z {z0}:{z0 + nz}",
        f"output: {plan.output} ({'plain zarr array' if plan.options.zarr_only else 'OME-Zarr, NGFF 0.4'}), "
        f"{plan.dtype}, chunks {chunk}^3, downsampling {plan.options.algorithm}",
    ]
    total = 0
    for level, shape in enumerate(plan.shapes):
        count = _chunk_count(shape, chunk)
        total += count
        lines.append(f"  level {level}: {shape[0]} x {shape[1]} x {shape[2]} (z, y, x), {count} chunks")
    nbytes = total * chunk**3 * plan.dtype.itemsize
    lines.append(f"  {total} chunks, at most {format_bytes(nbytes)} (all-zero chunks are not written)")
    bz, by, bx = plan.blocks[0]
    lines.append(
        f"memory: about {format_bytes(plan.budget)} for buffers; level 0 read in blocks of {bz} x {by} x {bx} voxels"
    )
    return "\n".join(lines)


def _write_nonzero_chunks(array: zarr.Array, data: np.ndarray, corner: Shape3, chunk: int) -> int:
    """Write each chunk of ``data`` (placed at ``corner``, chunk-aligned) that is not all zero."""
    written = 0
    for box in iter_boxes(data.shape, (chunk, chunk, chunk)):  # type: ignore[arg-type]
        local = tuple(slice(a, b) for a, b in box)
        piece = data[local]
        if piece.any():
            array[tuple(slice(c + a, c + b) for c, (a, b) in zip(corner, box, strict=True))] = piece
            written += 1
    return written


def write_level0_block(plan: Plan, array: zarr.Array, box: Box) -> int:
    """Read ``box`` of the converted volume from the TIFFs and write its non-zero chunks.

    Returns the number of chunk files written.
    """
    (z0, z1), (y0, y1), (x0, x1) = box
    oz, oy, ox = plan.origin
    block = np.empty((z1 - z0, y1 - y0, x1 - x0), plan.stack.dtype)
    for index, z in enumerate(range(z0, z1)):
        read_rows(plan.stack, oz + z, (oy + y0, oy + y1), (ox + x0, ox + x1), block[index])
    if plan.dtype != plan.stack.dtype:
        block = ds.to_uint8(block)
    return _write_nonzero_chunks(array, block, (z0, y0, x0), plan.options.chunk_size)


def write_downsampled_block(
    source: zarr.Array, target: zarr.Array, box: Box, algorithm: ds.Algorithm, chunk: int
) -> int:
    """Build ``box`` of ``target`` from the stored level above, ``source``; write its non-zero chunks."""
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
    return _write_nonzero_chunks(target, result, tuple(a for a, _ in box), chunk)  # type: ignore[arg-type]


def _run_units(units: Iterable[tuple[Box, Callable[[Box], int]]], progress: tqdm, report: LevelReport) -> None:
    for box, work in units:
        report.chunks_written += work(box)
        progress.update(box_size(box))


def _progress(shapes: Iterable[Shape3], quiet: bool) -> tqdm:
    total = sum(s[0] * s[1] * s[2] for s in shapes)
    return tqdm(total=total, unit="vox", unit_scale=True, disable=quiet, mininterval=1.0, desc="converting")


def _build_levels(
    group: zarr.Group,
    first: int,
    shapes: tuple[Shape3, ...],
    dtype: np.dtype,
    chunk: int,
    algorithm: ds.Algorithm,
    blocks: tuple[Shape3, ...],
    progress: tqdm,
    report: Report,
) -> None:
    """Create and fill levels ``first …`` from the stored level above each, in ``blocks`` (one per level)."""
    for level, block in zip(range(first, len(shapes)), blocks, strict=True):
        target = create_level(group, str(level), shapes[level], chunk, dtype)
        source = group[str(level - 1)]
        assert isinstance(source, zarr.Array)
        log.debug("level %d: blocks of %s voxels (z, y, x)", level, " x ".join(map(str, block)))
        progress.set_description(f"level {level}")
        level_report = report.levels[level] = LevelReport(shapes[level], _chunk_count(shapes[level], chunk))

        def work(box: Box, source: zarr.Array = source, target: zarr.Array = target) -> int:
            return write_downsampled_block(source, target, box, algorithm, chunk)

        _run_units(((box, work) for box in iter_boxes(shapes[level], block)), progress, level_report)


def _stack_attributes(plan: Plan) -> dict[str, object]:
    return {
        "source_directory": str(plan.input_dir.resolve()),
        "origin_zyx": list(plan.origin),
        "missing_slices": plan.missing,
        "obytes": plan.options.obytes,
    }


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
    progress = _progress(plan.shapes, options.quiet)
    with progress:
        if options.zarr_only:
            group = None
            level0 = create_level(plan.output, None, plan.shapes[0], chunk, plan.dtype)
        else:
            group = zarr.open_group(str(plan.output), mode="w", zarr_format=2)
            level0 = create_level(group, "0", plan.shapes[0], chunk, plan.dtype)
        progress.set_description("level 0")
        log.debug("level 0: blocks of %s voxels (z, y, x)", " x ".join(map(str, plan.blocks[0])))
        report.levels[0] = LevelReport(plan.shapes[0], _chunk_count(plan.shapes[0], chunk))

        def work(box: Box) -> int:
            return write_level0_block(plan, level0, box)

        _run_units(((box, work) for box in iter_boxes(plan.shapes[0], plan.blocks[0])), progress, report.levels[0])
        if group is None:
            level0.attrs["scrollzarr"] = _stack_attributes(plan)
        else:
            _build_levels(
                group, 1, plan.shapes, plan.dtype, chunk, options.algorithm, plan.blocks[1:], progress, report
            )
            multiscale = Multiscale.pyramid(
                plan.output.stem,
                len(plan.shapes),
                plan.origin if plan.cropped else None,
                options.algorithm,
                _downsampling_parameters(options.algorithm),
            )
            group.attrs.update({"scrollzarr": _stack_attributes(plan), "multiscales": [multiscale.to_json()]})
    report.seconds = time.monotonic() - started
    return report


def _downsampling_parameters(algorithm: ds.Algorithm) -> dict[str, object]:
    if algorithm == "gaussian":
        return {"sigma": ds.GAUSSIAN_SIGMA, "truncate": ds.GAUSSIAN_TRUNCATE}
    return {}


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
        entry = group.attrs["multiscales"][0]  # type: ignore[index]
        multiscale = Multiscale.from_json(entry)  # type: ignore[arg-type]
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
    origin = None if translation is None else tuple(int(v) for v in translation)
    dtype = np.dtype(source.dtype)
    plane = chunk * source.shape[1] * source.shape[2] * dtype.itemsize
    budget = _budget(options, plane, shapes[first - 1 :], dtype, chunk)
    return RebuildPlan(
        output=output,
        first=first,
        shapes=shapes,
        dtype=dtype,
        chunk=chunk,
        origin=origin,  # type: ignore[arg-type]
        algorithm=options.algorithm,
        budget=budget,
        blocks=tuple(_lower_blocks(shapes[first - 1 :], dtype, chunk, options.algorithm, budget)),
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
    with _progress(plan.shapes[plan.first :], plan.quiet) as progress:
        _build_levels(
            group, plan.first, plan.shapes, plan.dtype, plan.chunk, plan.algorithm, plan.blocks, progress, report
        )
    multiscale = Multiscale.pyramid(
        plan.output.stem,
        len(plan.shapes),
        plan.origin,  # type: ignore[arg-type]
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
    lines.append(f"memory: about {format_bytes(plan.budget)} for buffers")
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
