"""Levels built from the stored level above, block by block: what the bands cannot stream,
and ``--first_new_level``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from itertools import product
from pathlib import Path

import numpy as np
import zarr

from scrollzarr import downsample as ds
from scrollzarr.blocks import Box, Shape3, box_size, iter_boxes, shape3
from scrollzarr.layout import StoreLayout
from scrollzarr.progress import Progress
from scrollzarr.report import ProgressBar, Report
from scrollzarr.sinks import LevelSink, SinkSpec, open_sink
from scrollzarr.store import read_checked, read_region
from scrollzarr.workers import Workers

log = logging.getLogger(__name__)


def build_from_above(
    group: zarr.Group,
    output: Path,
    layout: StoreLayout,
    first: int,
    blocks: tuple[Shape3, ...],
    algorithm: ds.Algorithm,
    workers: Workers,
    bar: ProgressBar,
    report: Report,
    record: Progress,
    checkpoint: Callable[[], None],
    advice: str | None,
) -> None:
    """Fill levels ``first …`` of ``group`` (the store at ``output``, levels in ``layout``) from the stored level
    above each, in ``blocks`` (whole write units), a row of units in z at a time.

    Rows that ``record`` lists as done are skipped; ``checkpoint`` is called after each row.
    ``advice``: what to do about a damaged chunk of level ``first - 1``, if it was not written by this
    run (``--first_new_level``); ``None`` where every level read was (its damaged chunks were found and
    written again before, by ``--resume``).
    """
    for level, block in enumerate(blocks, start=first):
        source, target = group[str(level - 1)], group[str(level)]
        assert isinstance(source, zarr.Array) and isinstance(target, zarr.Array)
        writer = open_sink(SinkSpec(output / str(level), shape3(target.shape), str(np.dtype(target.dtype)), layout))
        log.debug("level %d: from level %d in blocks of %s (z, y, x)", level, level - 1, " x ".join(map(str, block)))
        bar.set_description(f"level {level}")
        done = record.rows_done.get(str(level), 0)

        def work(box: Box, source: zarr.Array = source, writer: LevelSink = writer, level: int = level) -> int:
            written = write_downsampled_block(source, writer, box, algorithm, advice if level == first else None)
            bar.update(box_size(box))
            return written

        for row, boxes in enumerate(_rows(list(iter_boxes(shape3(target.shape), block)))):
            if row < done:
                bar.update(sum(box_size(box) for box in boxes))
                continue
            report.levels[level].chunks_written += sum(workers.run(partial(work, box) for box in boxes))
            record.rows_done[str(level)] = row + 1
            checkpoint()


def _rows(boxes: list[Box]) -> list[list[Box]]:
    """Boxes grouped by their z range (``iter_boxes`` gives them z slowest)."""
    rows: dict[tuple[int, int], list[Box]] = {}
    for box in boxes:
        rows.setdefault(box[0], []).append(box)
    return list(rows.values())


def write_downsampled_block(
    source: zarr.Array, writer: LevelSink, box: Box, algorithm: ds.Algorithm, advice: str | None
) -> int:
    """Build ``box`` (whole write units) of a level from the stored level above, ``source``; write its units;
    the number of chunks that were not all zero.

    Unsharded, the box is built at once and cut into chunks.  Sharded, each
    shard is built a chunk at a time, as its sink asks for them
    (:meth:`~scrollzarr.sinks.LevelSink.write_parts`): a worker holds one
    chunk's part of the level above, not a shard's (a 128 x 1024 x 1024 shard
    of uint16 is built from 2 GiB of the level above).  With ``advice``, a
    damaged chunk of ``source`` is a message that ends with it.
    """
    if writer.unit != writer.chunks:
        part = partial(downsampled, source, algorithm=algorithm, advice=advice)
        (z0, z1), (y0, y1), (x0, x1) = box
        uz, uy, ux = writer.unit
        corners = product(range(z0, z1, uz), range(y0, y1, uy), range(x0, x1, ux))
        return sum((writer.write_parts(corner, part) for corner in corners), 0)
    result = downsampled(source, box, algorithm, advice)
    (z0, _), (y0, _), (x0, _) = box
    written = 0
    for local in iter_boxes(shape3(result.shape), writer.unit):
        (z, _), (y, _), (x, _) = local
        piece = result[tuple(slice(a, b) for a, b in local)]
        written += writer.write((z0 + z, y0 + y, x0 + x), piece)
    return written


def downsampled(source: zarr.Array, box: Box, algorithm: ds.Algorithm, advice: str | None) -> np.ndarray:
    """The voxels of ``box`` of a level, built from the stored level above, ``source``.

    Returns
    -------
    ndarray, the box's shape, the source's dtype
    """
    margin = ds.halo(algorithm)
    read = tuple(
        slice(max(2 * a - margin, 0), min(2 * b + margin, n)) for (a, b), n in zip(box, source.shape, strict=True)
    )
    data = read_region(source, read) if advice is None else read_checked(source, read, advice)
    if algorithm == "gaussian":
        core_z, core_y, core_x = (
            slice(2 * a - r.start, min(2 * b, n) - r.start)
            for (a, b), r, n in zip(box, read, source.shape, strict=True)
        )
        return ds.downsample_gaussian(data, (core_z, core_y, core_x))
    return ds.downsample(data, algorithm)
