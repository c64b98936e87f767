"""``ppm_to_layers --merge_parts``: the layer TIFFs of a render rendered in parts (``--num_parts``), joined.

Part ``i`` of ``K`` wrote the rows of its bands into ``NN.part<i>.tif`` (and
``STACK.part<i>.tif``); the merge checks that every part finished and holds
the rows the same arguments give it, lays out the whole images as a render
does, copies each part's rows in at their place, and then behaves as the end
of a render: every image flushed, renamed, recorded.  The images are those
of a render in one part, byte for byte.  Once they are on the disk, the
part files (and the parts' records) are removed: they are the same pixels
again.  While it runs it holds the directory's lock and every part's, so no
part is rendered into the directory meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from scrollzarr import layermanifest as manifest
from scrollzarr import renderprogress
from scrollzarr.durable import fsync_directories, hidden_partial_path
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.layers import (
    BAND_BYTES,
    LayerOptions,
    RenderPart,
    check_space,
    fingerprint_of,
    layer_names,
    open_surface,
    render_part,
    stack_lock_name,
)
from scrollzarr.layertiff import ImageRows, LayerTiff
from scrollzarr.outputlock import LOCK_NAME, OutputLock
from scrollzarr.sizes import format_bytes
from scrollzarr.volume import open_volume

log = logging.getLogger(__name__)


def merge_parts(
    surface_path: Path, zarr_path: Path | str, output_dir: Path, stack_path: Path | None, options: LayerOptions
) -> str:
    """Join the ``options.num_parts`` parts of a render into its layer TIFFs (and stacked image); the summary.

    Raises
    ------
    ScrollzarrError
        For a part that is missing, unfinished or not of this render, or final images that exist without
        ``--overwrite``.  Nothing under a final name is written unless every image is.
    """
    options.check()
    if options.num_parts < 2:
        raise UsageError("--merge_parts joins the parts of a render: give --num_parts, the number of parts rendered")
    if options.resume:
        raise UsageError("--merge_parts has nothing to resume: merge again (the parts are kept until it succeeds)")
    if options.part_id:
        raise UsageError("--merge_parts joins every part: leave --part_id out")
    surface = open_surface(surface_path, options)
    volume = open_volume(zarr_path, options.level, options.disk_cache)
    dtype = volume.array.dtype
    parts = [render_part(surface, replace(options, part_id=number), dtype) for number in range(options.num_parts)]
    names = layer_names(options.layers)
    started = time.perf_counter()
    with ExitStack() as locks:
        locks.enter_context(OutputLock(output_dir, "output directory"))
        for part in parts:
            what = f"output directory (part {part.number} of its render)"
            locks.enter_context(OutputLock(output_dir, what, part.name(LOCK_NAME)))
        if stack_path is not None:
            locks.enter_context(OutputLock(stack_path.parent, "stacked image", stack_lock_name(stack_path), stack_path))
        sources = []
        for part in parts:
            part_stack = None if stack_path is None else part.file(stack_path)
            expected = fingerprint_of(surface, volume, zarr_path, part_stack, options, dtype, part)
            sources.append(_part_files(output_dir, stack_path, names, part, surface.width, dtype, expected))
        finals = [output_dir / name for name in names] + ([] if stack_path is None else [stack_path])
        existing = [final for final in finals if final.exists()]
        if existing and not options.overwrite:
            raise ScrollzarrError(f"{existing[0]} exists; add --overwrite to replace the merged images")
        check_space(output_dir, stack_path, surface.height * surface.width * dtype.itemsize, options.layers)
        # The merge holds the whole render's lock and every part's: each of their records is its own to tidy.
        records = [manifest.MANIFEST_NAME, renderprogress.NAME]
        records += [part.name(record) for part in parts for record in (manifest.MANIFEST_NAME, renderprogress.NAME)]
        manifest.remove_leftovers(output_dir, records)
        previous = manifest.read_manifest(output_dir) if options.overwrite else None
        partial_names = [hidden_partial_path(output_dir / name).name for name in names]
        files: list[LayerTiff] = []
        restored = previous
        try:
            creating = manifest.add_pending(output_dir, previous, dict.fromkeys(partial_names))
            for final in finals:
                files.append(LayerTiff(final, surface.height, surface.width, dtype))
            pending = manifest.add_pending(output_dir, creating, {name: name for name in partial_names})
            for part, part_files in zip(parts, sources, strict=True):
                for target, source in zip(files, part_files, strict=True):
                    _copy_rows(source, target, part.rows[0], surface.width * dtype.itemsize)
            for file in files:
                file.flush()
            finals_named = dict(zip(names, partial_names, strict=True))
            restored = manifest.add_pending(output_dir, pending, finals_named)
            for file in files:
                file.commit()
        except BaseException:
            for file in files:
                file.discard()
            manifest.restore(output_dir, restored)
            raise
        manifest.remove_stale(output_dir, previous, set(names) | set(partial_names))
        manifest.write_finished(output_dir, names, surface.height, surface.width, dtype)
        fsync_directories([output_dir] if stack_path is None else [output_dir, stack_path.parent])
        removed = _remove_parts(output_dir, parts, sources)
    nbytes = sum(final.stat().st_size for final in finals)
    return (
        f"merged {len(parts)} parts into {options.layers} layers of {surface.width} x {surface.height} ({dtype}) in "
        f"{output_dir}{'' if stack_path is None else f' and {stack_path}'} ({format_bytes(nbytes)} in "
        f"{time.perf_counter() - started:.1f} s); removed the {removed} part files"
    )


def _part_files(
    output_dir: Path,
    stack_path: Path | None,
    names: list[str],
    part: RenderPart,
    width: int,
    dtype: np.dtype,
    fingerprint: dict[str, Any],
) -> list[Path]:
    """The finished images of ``part``, checked to be what these arguments render (layers in order, then the
    stacked image)."""
    progress_name = part.name(renderprogress.NAME)
    if renderprogress.exists(output_dir, progress_name):
        raise ScrollzarrError(
            f"part {part.number} of {part.count} in {output_dir} has not finished; finish it first (the same "
            f"command with --part_id {part.number} --resume), then merge"
        )
    files = [output_dir / part.name(name) for name in names] + ([] if stack_path is None else [part.file(stack_path)])
    record = manifest.read_manifest(output_dir, part.name(manifest.MANIFEST_NAME))
    recorded = {} if record is None else record.description.get("fingerprint", {})
    for key in sorted(recorded.keys() | fingerprint.keys()):
        if recorded and recorded.get(key) != fingerprint.get(key):
            raise ScrollzarrError(
                f"part {part.number} in {output_dir} was rendered with {key} {json.dumps(recorded.get(key))}, this "
                f"merge asks for {json.dumps(fingerprint.get(key))}; merge with the parts' arguments"
            )
    for path in files:
        try:
            with tifffile.TiffFile(path) as tiff:
                page = tiff.pages[0]
                good = page.shape == (part.height, width) and page.dtype == dtype and page.is_contiguous
        except FileNotFoundError:
            merged = manifest.read_manifest(output_dir)
            if merged is not None and merged.description.get("height", 0) > part.height:
                raise ScrollzarrError(
                    f"{path} is missing, and {output_dir} holds the merged images already: a merge stopped while it "
                    "removed the part files; delete the part files left (NN.partI.tif) yourself"
                ) from None
            raise ScrollzarrError(
                f"{path} is missing: part {part.number} of {part.count} has not been rendered into {output_dir} "
                f"(render it with --num_parts {part.count} --part_id {part.number}), or was rendered with other "
                "arguments"
            ) from None
        except (tifffile.TiffFileError, ValueError, IndexError) as error:
            raise ScrollzarrError(f"{path} cannot be read as a part's image ({error}); render the part again") from None
        if not good:
            raise ScrollzarrError(
                f"{path} is not part {part.number}'s image of this render ({part.height} x {width} {dtype}: surface "
                f"rows {part.rows[0]}:{part.rows[1]}); give the arguments the parts were rendered with"
            )
    return files


def _copy_rows(source: Path, target: LayerTiff, first: int, row_bytes: int) -> None:
    """Copy the rows of the part image ``source`` into ``target`` from row ``first`` on, a band at a time."""
    with tifffile.TiffFile(source) as tiff:
        page = tiff.pages[0]
        offset, height = int(page.dataoffsets[0]), page.shape[0]
    rows = max(1, BAND_BYTES // row_bytes)
    # one thread writes the merged image, band after band: direct I/O is safe (RowFile)
    with ImageRows(target.path, target.offset, row_bytes).open(direct=True) as image, open(source, "rb") as file:
        for v0 in range(0, height, rows):
            count = min(rows, height - v0)
            file.seek(offset + v0 * row_bytes)
            data = file.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ScrollzarrError(f"{source} is cut short; render its part again")
            image.write(first + v0, np.frombuffer(data, np.uint8).reshape(count, row_bytes))


def _remove_parts(output_dir: Path, parts: list[RenderPart], sources: list[list[Path]]) -> int:
    """Remove the parts' images and records (the merged images hold their pixels now); how many files."""
    count = 0
    for part, files in zip(parts, sources, strict=True):
        for path in files:
            path.unlink(missing_ok=True)
            count += 1
        (output_dir / part.name(manifest.MANIFEST_NAME)).unlink(missing_ok=True)
    fsync_directories(sorted({path.parent for files in sources for path in files}))
    return count
