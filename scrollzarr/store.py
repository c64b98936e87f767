"""The output store: name checks, safe replacement, and level arrays with the project's defaults.

Everything goes through zarr's store abstraction except the checks on what an
existing directory holds before it may be replaced, which look at the disk (or,
for an output in a bucket, list its prefix: :class:`~scrollzarr.storage.ObjectStore`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from itertools import product
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from scrollzarr import progress
from scrollzarr.blocks import shape3
from scrollzarr.durable import fsync_path, remove_durably
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.layout import UnsupportedLayout, layout_of
from scrollzarr.outputlock import LOCK_NAME
from scrollzarr.sinks import SinkSpec, damage
from scrollzarr.storage import Location, ObjectStore

log = logging.getLogger(__name__)

# The files that make a directory a zarr group or array, format 2 or 3: every tool's one list of them.
ZARR_METADATA = (".zgroup", ".zarray", "zarr.json")
# The metadata at a store's root, in the order a replaced store loses it (see empty_output).
ROOT_METADATA = (".zarray", ".zattrs", ".zgroup", "zarr.json")
# In a bucket (no lock file to say whose it is): the object that marks a prefix being emptied for --overwrite.
EMPTYING_KEY = "scrollzarr_emptying"


class OutputError(ScrollzarrError):
    """The output path cannot be written as asked."""


def check_output_name(output: Location) -> None:
    """Refuse an output whose name does not end in ``.zarr``."""
    if output.suffix != ".zarr":
        example = Path(output.name or "output").with_suffix(".zarr").name
        raise UsageError(f"output {output} must end in .zarr (for example {example})")


def is_zarr_store(path: Location) -> bool:
    """Whether ``path`` is a zarr array or group directory (format 2 or 3), or a store begun by scroll_to_ome."""
    # a directory with a progress record is a conversion stopped before it wrote the zarr metadata
    if isinstance(path, ObjectStore):
        return any(path.exists(marker) for marker in (*ZARR_METADATA, progress.KEY))
    return path.is_dir() and any((path / marker).is_file() for marker in (*ZARR_METADATA, progress.KEY))


def is_emptied(output: Location) -> bool:
    """Whether ``output`` is what a run stopped while :func:`empty_output` emptied it: its lock file, and
    nothing but level directories, temporary files, the list of slice files and perhaps ``.zattrs``: not the
    files that make a directory a zarr node (which the emptying removes first, and a finished store keeps)
    or the progress record.  In a bucket: the object :data:`EMPTYING_KEY`, and neither those nor the record."""
    if isinstance(output, ObjectStore):
        return output.exists(EMPTYING_KEY) and not is_zarr_store(output)
    if not output.is_dir() or output.is_symlink():
        return False
    names = {path.name: path for path in output.iterdir()}
    if any(name in names for name in (*ZARR_METADATA, progress.KEY)):
        return False
    ours = {LOCK_NAME, ".zattrs", progress.SLICES_KEY}
    return LOCK_NAME in names and all(
        name in ours
        or name.endswith(".partial")
        or ((name.isdigit() or name == "c") and path.is_dir() and not path.is_symlink())  # levels; zarr 3 chunks
        for name, path in names.items()
    )


def is_abandoned(output: Location) -> bool:
    """Whether ``output`` holds nothing but a run's lock file (and temporary files): killed before it wrote anything.

    Our own run, holding the lock, sees its output so too until it writes.  (A bucket has no lock files.)
    """
    if isinstance(output, ObjectStore) or not output.is_dir() or output.is_symlink():
        return False
    names = [path.name for path in output.iterdir()]
    return LOCK_NAME in names and all(name == LOCK_NAME or name.endswith(".partial") for name in names)


def check_replaceable(output: Location, overwrite: bool, input_dir: Path | None) -> None:
    """Check, before anything is written, that ``output`` may be created or replaced.

    A directory that holds nothing but a lock file (a run killed before its
    first write, or this run holding the lock) counts as absent.

    Raises
    ------
    OutputError
        If the output exists and ``overwrite`` is false, or it exists but is
        not a zarr store or an empty directory, or it is or contains the input.
    """
    if isinstance(output, ObjectStore):
        _check_replaceable_prefix(output, overwrite)
        return
    if (not output.exists() and not output.is_symlink()) or is_abandoned(output):
        return
    if not overwrite:
        raise OutputError(f"output {output} already exists; pass --overwrite to replace it, or choose another name")
    if not output.is_dir():
        raise OutputError(f"output {output} exists and is not a directory; --overwrite only replaces zarr stores")
    if input_dir is not None and input_dir.exists():
        resolved_input, resolved_output = input_dir.resolve(), output.resolve()
        if resolved_input == resolved_output or resolved_output in resolved_input.parents:
            raise OutputError(
                f"output {output} is or contains the input directory {input_dir}; "
                "--overwrite would delete the input, choose another output"
            )
        if resolved_input in resolved_output.parents:
            raise OutputError(
                f"output {output} is inside the input directory {input_dir}; --overwrite will not delete "
                "anything in the input's tree, write the output elsewhere"
            )
    if not (is_zarr_store(output) or is_emptied(output) or not any(output.iterdir())):
        raise OutputError(
            f"output {output} exists and is not a zarr store; --overwrite only replaces zarr stores "
            "or empty directories, so move it away or choose another name"
        )


def _check_replaceable_prefix(output: ObjectStore, overwrite: bool) -> None:
    """:func:`check_replaceable` for a prefix in a bucket: absent (no object under it), or a zarr store (or one
    a stopped ``--overwrite`` was emptying) replaced with ``overwrite``."""
    if not output.listing():
        return
    if not overwrite:
        raise OutputError(f"output {output} already exists; pass --overwrite to replace it, or choose another name")
    if not (is_zarr_store(output) or is_emptied(output)):
        raise OutputError(
            f"output {output} holds objects but is not a zarr store; --overwrite only replaces zarr stores, "
            "so delete them yourself or choose another prefix"
        )


class DamagedChunkError(OutputError):
    """A chunk or shard file that cannot be read as one: the wrong size, a bad shard index, or not decodable."""


ChunkIndex = tuple[int, ...]


def chunk_nbytes(array: zarr.Array) -> int:
    """Bytes of one whole chunk of ``array``, uncompressed."""
    return math.prod(array.chunks) * np.dtype(array.dtype).itemsize


def array_directory(array: zarr.Array) -> Path:
    """The directory of ``array``, an array of a store on disk (a :class:`~zarr.storage.LocalStore`)."""
    store = array.store
    assert isinstance(store, LocalStore), f"{store} is not a store on disk"
    return Path(store.root, array.path)


def chunk_file(array: zarr.Array, index: ChunkIndex) -> Path:
    """The file that holds chunk ``index`` of ``array`` (an array of a store on disk)."""
    return array_directory(array) / array.metadata.encode_chunk_key(index)


def sink_spec(array: zarr.Array) -> SinkSpec:
    """What a sink of ``array`` (a level of a store on disk, in a layout scroll_to_ome writes) needs.

    Raises
    ------
    UnsupportedLayout
        If the array's layout is not one scroll_to_ome writes.
    """
    return SinkSpec(array_directory(array), shape3(array.shape), str(np.dtype(array.dtype)), layout_of(array))


def unit_files(spec: SinkSpec) -> list[Path]:
    """The files of the write units (chunks, or shards) of the level ``spec`` describes, not those of the levels
    beside or below it; none for a level in a bucket (an object is put whole: no unit there is cut short)."""
    if isinstance(spec.directory, ObjectStore):
        return []
    directory = spec.directory if spec.layout.zarr_format == 2 else spec.directory / "c"
    return [
        path
        for path in directory.glob("*/*/*")
        if path.is_file() and all(part.isdigit() for part in path.relative_to(directory).parts)
    ]


def unit_index(spec: SinkSpec, path: Path) -> ChunkIndex:
    """The index of the write unit whose file is ``path``, in units of :attr:`~scrollzarr.layout.StoreLayout.unit`."""
    assert isinstance(spec.directory, Path)  # unit files are found on disks only (unit_files)
    directory = spec.directory if spec.layout.zarr_format == 2 else spec.directory / "c"
    return tuple(int(part) for part in path.relative_to(directory).parts)


def damaged_units(spec: SinkSpec) -> list[tuple[Path, str]]:
    """The unit files of a level that are damaged, with what is wrong with each (:func:`scrollzarr.sinks.damage`).

    Every unit this project writes has a size its layout fixes (uncompressed
    chunks) or an index that must agree with its size (shards), so other sizes
    are damage: a write cut off under its final name by a power cut before it was
    flushed, or a disk fault.  Compressed chunk files are not decoded here (that
    would read the whole level), only their framing checked (a file cut short is
    found): :func:`read_checked` finds the rest when they are read.
    """
    found = ((path, damage(path, spec)) for path in unit_files(spec))
    return [(path, problem) for path, problem in found if problem is not None]


def read_region(array: zarr.Array, region: tuple[slice, ...]) -> np.ndarray:
    """``array[region]``: zarr types a read as any array-like or a scalar; a region of slices read into numpy
    buffers (zarr's default, the one this package uses) is an ndarray."""
    data = array[region]
    assert isinstance(data, np.ndarray)
    return data


def read_checked(array: zarr.Array, region: tuple[slice, ...], advice: str) -> np.ndarray:
    """``array[region]``; a damaged unit in it is a :class:`DamagedChunkError` naming the file, with ``advice``.

    The units' framing is checked before the read (a few bytes of each file):
    blosc decodes a chunk cut short without an error, from bytes past its end
    (numcodecs does not check the header's size against the buffer).
    """
    local = isinstance(array.store, LocalStore)
    try:
        damaged = _damaged_in(array, region, decode=False) if local else []
        if not damaged:
            return read_region(array, region)
    except Exception:  # zarr and the codecs raise many kinds for bytes that are not what the metadata says
        damaged = _damaged_in(array, region, decode=True) if local else []
        if not damaged:
            raise
    path, problem = damaged[0]
    raise DamagedChunkError(f"chunk file {path} is damaged ({problem}); {advice}") from None


def _damaged_in(array: zarr.Array, region: tuple[slice, ...], decode: bool) -> list[tuple[Path, str]]:
    """The damaged unit files among those that hold ``region`` of ``array``, compressed ones decoded with
    ``decode``."""
    try:
        spec = sink_spec(array)
    except UnsupportedLayout:
        return []
    spans = [part.indices(n)[:2] for part, n in zip(region, array.shape, strict=True)]
    ranges = [range(a // u, -(-b // u)) for (a, b), u in zip(spans, spec.layout.unit, strict=True)]
    found = []
    assert isinstance(spec.directory, Path)  # a store on disk (sink_spec)
    for index in product(*ranges):
        path = spec.directory / spec.layout.chunk_key(index)
        problem = damage(path, spec, decode=decode) if path.is_file() else None
        if problem is not None:
            found.append((path, problem))
    return found


def readable_metadata(path: Location) -> bool:
    """Whether the zarr metadata file ``path`` is there and holds a JSON object.

    A metadata file renamed into place but not yet flushed can come back empty
    after a power cut (ext4 does so); such a file counts as missing.
    """
    try:
        data = path.get("") if isinstance(path, ObjectStore) else path.read_bytes()
        return isinstance(json.loads(data), dict)
    except (OSError, ValueError):
        return False


def remove_unreadable_metadata(directory: Location) -> None:
    """Delete the zarr metadata files in ``directory`` that are there but do not parse, to be written again."""
    if isinstance(directory, ObjectStore):  # an object is put whole: it parses, or it is not there
        return
    for name in ROOT_METADATA:
        path = directory / name
        if path.is_file() and not readable_metadata(path):
            log.warning("%s cannot be read; it is written again", path)
            path.unlink()


# --overwrite empties a store again this many times, this many seconds apart, while a unit or two that tasks of a
# stopped run were writing when their fence went still land in it (each task writes one unit at a time)
_EMPTY_ATTEMPTS = 10
_EMPTY_PAUSE = 0.5


def remove_partial_files(output: Location) -> int:
    """Delete the temporary files a stopped run left (the store writes ``*.partial``, then renames; a bucket has
    none)."""
    if isinstance(output, ObjectStore):
        return 0
    leftovers = list(output.rglob("*.partial"))
    for path in leftovers:
        # missing_ok: a task of the stopped run, still running on its worker, may rename its own away meanwhile
        path.unlink(missing_ok=True)
    return len(leftovers)


def empty_output(output: Location) -> None:
    """Delete everything in the directory ``output`` but the lock file; call only after :func:`check_replaceable`.

    The directory and the lock stay: deleting them would let another run take
    the output while this one writes it.  The order makes every stop leave a
    store that is either whole or visibly not finished: first the root metadata
    (``.zarray``, then ``.zattrs`` with ``multiscales``, then ``.zgroup``), flushed,
    so that no reader takes what follows for an array or an OME-Zarr; then the
    list of slice files and the progress record, durably (until then the record
    vouches only for chunks still there, and ``--resume`` continues that run);
    then the rest.  What a stop leaves after the record is gone is taken by
    ``--overwrite`` (:func:`is_emptied`).  In a bucket, see :func:`_empty_prefix`.
    """
    if isinstance(output, ObjectStore):
        _empty_prefix(output)
        return
    for name in ROOT_METADATA:
        (output / name).unlink(missing_ok=True)
    fsync_path(output)
    (output / progress.SLICES_KEY).unlink(missing_ok=True)
    remove_durably(output / progress.KEY)
    # the fences of a run of tasks next, durably: a killed client's tasks still running on their workers stop
    # before their next unit, instead of writing into the level directories deleted below (and made again)
    if (output / progress.MARKERS).is_dir():
        shutil.rmtree(output / progress.MARKERS)
        fsync_path(output)
    for attempt in range(_EMPTY_ATTEMPTS):
        try:
            for path in output.iterdir():
                if path.name == LOCK_NAME:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            return
        except OSError as error:  # ENOTEMPTY, ENOENT: a unit that such a task was writing as its fence went
            if attempt + 1 == _EMPTY_ATTEMPTS:
                raise OutputError(
                    f"cannot empty {output}: something writes into it ({error.strerror}); if a stopped "
                    "--scheduler run's tasks are still running on the cluster, wait for them to end (or restart "
                    "the workers), then run again"
                ) from None
            time.sleep(_EMPTY_PAUSE)


def _empty_prefix(output: ObjectStore) -> None:
    """:func:`empty_output` in a bucket, where no lock file says whose a prefix is.

    First the object :data:`EMPTYING_KEY`, which marks the prefix as ours while it
    is emptied (:func:`is_emptied`: ``--overwrite`` again replaces what a stop
    leaves, ``--resume`` refuses it); then the root metadata, the list of slice
    files, the record and the task markers (so that no reader takes the rest for a
    store, and no marker outlives the record it belongs to); then every other
    object; the mark last.
    """
    output.put(EMPTYING_KEY, b"")
    for name in (*ROOT_METADATA, progress.SLICES_KEY, progress.KEY):
        output.delete(name)
    output.delete_all(progress.MARKERS)
    output.delete_keys([key for key in output.listing() if key != EMPTYING_KEY])
    output.delete(EMPTYING_KEY)
