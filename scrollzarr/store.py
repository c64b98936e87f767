"""The output store: name checks, safe replacement, and level arrays with the project's defaults.

Everything goes through zarr's store abstraction except the checks on what an
existing directory holds before it may be replaced, which look at the disk.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV2Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore

from scrollzarr import progress
from scrollzarr.durable import fsync_path, remove_durably, temporary_path
from scrollzarr.errors import ScrollzarrError, UsageError
from scrollzarr.outputlock import LOCK_NAME

log = logging.getLogger(__name__)

# The files that make a directory a zarr group or array, format 2 or 3: every tool's one list of them.
ZARR_METADATA = (".zgroup", ".zarray", "zarr.json")
# The metadata at a store's root, in the order a replaced store loses it (see empty_output).
ROOT_METADATA = (".zarray", ".zattrs", ".zgroup")
# All-zero chunks are skipped by the pipeline itself (one cheap ``any()``), so zarr's
# own, much slower, emptiness test is switched off.
_ARRAY_CONFIG = {"write_empty_chunks": True}


class OutputError(ScrollzarrError):
    """The output path cannot be written as asked."""


def check_output_name(output: Path) -> None:
    """Refuse an output whose name does not end in ``.zarr``."""
    if output.suffix != ".zarr":
        raise UsageError(f"output {output} must end in .zarr (for example {output.with_suffix('.zarr').name})")


def is_zarr_store(path: Path) -> bool:
    """Whether ``path`` is a zarr array or group directory (format 2 or 3), or a store begun by scroll_to_ome."""
    # a directory with a progress record is a conversion stopped before it wrote the zarr metadata
    return path.is_dir() and any((path / marker).is_file() for marker in (*ZARR_METADATA, progress.KEY))


def is_emptied(output: Path) -> bool:
    """Whether ``output`` is what a run stopped while :func:`empty_output` emptied it: its lock file, and
    nothing but level directories, temporary files and the names of a store's own files (or nothing else)."""
    if not output.is_dir() or output.is_symlink():
        return False
    names = {path.name: path for path in output.iterdir()}
    ours = {LOCK_NAME, *ROOT_METADATA, progress.KEY, progress.SLICES_KEY}
    return LOCK_NAME in names and all(
        name in ours or name.endswith(".partial") or (name.isdigit() and path.is_dir() and not path.is_symlink())
        for name, path in names.items()
    )


def is_abandoned(output: Path) -> bool:
    """Whether ``output`` holds nothing but a run's lock file (and temporary files): killed before it wrote anything.

    Our own run, holding the lock, sees its output so too until it writes.
    """
    if not output.is_dir() or output.is_symlink():
        return False
    names = [path.name for path in output.iterdir()]
    return LOCK_NAME in names and all(name == LOCK_NAME or name.endswith(".partial") for name in names)


def check_replaceable(output: Path, overwrite: bool, input_dir: Path | None) -> None:
    """Check, before anything is written, that ``output`` may be created or replaced.

    A directory that holds nothing but a lock file (a run killed before its
    first write, or this run holding the lock) counts as absent.

    Raises
    ------
    OutputError
        If the output exists and ``overwrite`` is false, or it exists but is
        not a zarr store or an empty directory, or it is or contains the input.
    """
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


class DamagedChunkError(OutputError):
    """A chunk file that cannot be read as a chunk: the wrong size, or (compressed) not decodable."""


ChunkIndex = tuple[int, ...]


def chunk_nbytes(array: zarr.Array) -> int:
    """Bytes of one whole chunk of ``array``, uncompressed."""
    return math.prod(array.chunks) * np.dtype(array.dtype).itemsize


def chunk_file(array: zarr.Array, index: ChunkIndex) -> Path:
    """The file that holds chunk ``index`` of ``array`` (an array of a store on disk)."""
    return Path(array.store.root, array.path, array.metadata.encode_chunk_key(index))


def chunk_index(array: zarr.Array, path: Path) -> ChunkIndex:
    """The index of the chunk of ``array`` whose file is ``path`` (nested ``z/y/x`` keys, as this project writes)."""
    return tuple(int(part) for part in path.relative_to(Path(array.store.root, array.path)).parts)


def chunk_files(array: zarr.Array) -> list[Path]:
    """The chunk files of ``array`` (nested ``z/y/x`` keys), not those of the levels beside or below it."""
    directory = Path(array.store.root, array.path)
    return [
        path
        for path in directory.glob("/".join("*" * array.ndim))
        if path.is_file() and all(part.isdigit() for part in path.relative_to(directory).parts)
    ]


def damaged_chunks(array: zarr.Array) -> list[tuple[Path, int]]:
    """The chunk files of ``array`` (a level in a store on disk) whose size is not a whole chunk's, with their sizes.

    Every chunk this project writes is uncompressed and whole (padded at the
    far edges), so any other size is damage: a write cut off under its final
    name by a power cut before it was flushed, or a disk fault.
    """
    sizes = ((path, path.stat().st_size) for path in chunk_files(array))
    return [(path, size) for path, size in sizes if size != chunk_nbytes(array)]


def read_checked(array: zarr.Array, region: tuple[slice, ...], advice: str) -> np.ndarray:
    """``array[region]``; a damaged chunk in it is a :class:`DamagedChunkError` naming the file, with ``advice``."""
    try:
        return array[region]
    except ValueError:  # what zarr raises for an uncompressed chunk of the wrong size
        damaged = damaged_chunks(array) if isinstance(array.store, LocalStore) else []
        if not damaged:
            raise
        path, size = damaged[0]
        raise DamagedChunkError(
            f"chunk file {path} is damaged ({size} bytes, not {chunk_nbytes(array)}); {advice}"
        ) from None


def readable_metadata(path: Path) -> bool:
    """Whether the zarr metadata file ``path`` is there and holds a JSON object.

    A metadata file renamed into place but not yet flushed can come back empty
    after a power cut (ext4 does so); such a file counts as missing.
    """
    try:
        return isinstance(json.loads(path.read_bytes()), dict)
    except (OSError, ValueError):
        return False


def remove_unreadable_metadata(directory: Path) -> None:
    """Delete the zarr metadata files in ``directory`` that are there but do not parse, to be written again."""
    for name in ROOT_METADATA:
        path = directory / name
        if path.is_file() and not readable_metadata(path):
            log.warning("%s cannot be read; it is written again", path)
            path.unlink()


def open_store(output: Path) -> LocalStore:
    """The zarr store of the output directory."""
    return LocalStore(output)


def remove_partial_files(output: Path) -> int:
    """Delete the temporary files a stopped run left (the store writes ``*.partial``, then renames)."""
    leftovers = list(output.rglob("*.partial"))
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def empty_output(output: Path) -> None:
    """Delete everything in the directory ``output`` but the lock file; call only after :func:`check_replaceable`.

    The directory and the lock stay: deleting them would let another run take
    the output while this one writes it.  The order makes every stop leave a
    store that is either whole or visibly not finished: first the root metadata
    (``.zarray``, then ``.zattrs`` with ``multiscales``, then ``.zgroup``), flushed,
    so that no reader takes what follows for an array or an OME-Zarr; then the
    list of slice files and the progress record, durably (until then the record
    vouches only for chunks still there, and ``--resume`` continues that run);
    then the rest.  What a stop leaves after the record is gone is taken by
    ``--overwrite`` (:func:`is_emptied`).
    """
    for name in ROOT_METADATA:
        (output / name).unlink(missing_ok=True)
    fsync_path(output)
    (output / progress.SLICES_KEY).unlink(missing_ok=True)
    remove_durably(output / progress.KEY)
    for path in output.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def create_level(
    parent: zarr.Group | Path,
    name: str | None,
    shape: tuple[int, ...],
    chunk: int,
    dtype: np.dtype,
    overwrite: bool = True,
) -> zarr.Array:
    """Create one level: zarr format 2, cubic chunks, no compression, fill 0, ``/`` chunk keys.

    Parameters
    ----------
    parent : zarr.Group or Path
        A group to create the array ``name`` in, or a path for a plain array
        (``name`` then ``None``).
    overwrite : bool
        In a group: delete an existing array ``name`` with its chunks first.
        ``False`` writes only the metadata, keeping any chunks already there
        (``--resume`` repairing a level whose metadata a stop prevented).
    """
    settings: dict[str, Any] = {
        "shape": shape,
        "chunks": (chunk,) * len(shape),
        "dtype": dtype,
        "compressors": None,
        "filters": None,
        "fill_value": 0,
        "order": "C",
        "chunk_key_encoding": {"name": "v2", "separator": "/"},
        "config": _ARRAY_CONFIG,
    }
    if isinstance(parent, zarr.Group):
        assert name is not None
        return parent.create_array(name, overwrite=overwrite, **settings)
    return zarr.create_array(str(parent), zarr_format=2, **settings)


# Each thread's chunk buffers (reused: fresh buffers cost page faults), shared by all ChunkWriters.
_THREAD_BUFFERS = threading.local()

# Direct I/O (``O_DIRECT``) needs buffers, sizes and offsets in whole blocks of the device; 4096 bytes
# covers the block sizes of today's disks.
DIRECT_IO_BLOCK = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose buffer starts on a memory page (as direct I/O needs)."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    block = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    return np.frombuffer(block, dtype, count=count).reshape(shape)


def write_file(path: Path, data: np.ndarray, direct: bool = False) -> None:
    """Write ``data``'s bytes to ``path`` atomically: a temporary ``*.partial`` file, then a rename.

    Parameters
    ----------
    direct : bool
        Write with ``O_DIRECT``: straight from ``data`` to the disk, bypassing
        the page cache.  ``data`` must then be page-aligned (:func:`aligned_empty`)
        and a whole number of :data:`DIRECT_IO_BLOCK` bytes.  A file system without
        direct I/O raises ``OSError`` with ``EINVAL``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (_O_DIRECT if direct else 0)
    try:
        descriptor = os.open(temporary, flags, 0o666)
        try:
            view = memoryview(data).cast("B")
            done = 0
            while done < len(view):
                done += os.write(descriptor, view[done:])
            if not direct and hasattr(os, "posix_fadvise"):
                # Start writing it to disk now (Linux starts writeback of dirty pages on this advice),
                # so that the disk writes while the run still reads and computes, not after it ends.
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class ChunkWriter:
    """Writes whole chunks of one level array, skipping those that are all zero.

    The levels are uncompressed zarr format 2 arrays, so a chunk's stored form
    is its voxels in C order, little-endian, padded at the far edges to the full
    chunk shape with the fill value 0.  The bytes go to the array's store under
    the key zarr's chunk key encoding gives.  For a local store they are written
    straight from the calling thread, as zarr's LocalStore writes them (under a
    temporary ``*.partial`` name, then renamed into place), which costs a third
    of going through ``store.set`` and its event loop; any other store gets
    ``store.set``.

    Where the file system allows it, local chunk files are written with direct
    I/O, from the disk's point of view the same bytes, but without copying them
    into the page cache first: on the benchmark machine that copy took 40 % of
    the conversion's CPU time.  The first refusal (``EINVAL``, e.g. tmpfs)
    switches this writer to ordinary writes.

    Parameters
    ----------
    array : zarr.Array
        A level made by :func:`create_level`.
    """

    def __init__(self, array: zarr.Array) -> None:
        metadata = array.metadata
        if not isinstance(metadata, ArrayV2Metadata) or metadata.compressor is not None or metadata.filters:
            raise ValueError("ChunkWriter writes uncompressed zarr format 2 arrays only")
        self._array = array
        self.chunks = tuple(metadata.chunks)
        self._dtype = np.dtype(array.dtype).newbyteorder("<")
        self._prefix = f"{array.path}/" if array.path else ""
        self._prototype = default_buffer_prototype()
        nbytes = math.prod(self.chunks) * self._dtype.itemsize
        self._direct = bool(_O_DIRECT) and nbytes % DIRECT_IO_BLOCK == 0

    def write(self, corner: tuple[int, ...], piece: np.ndarray) -> bool:
        """Store ``piece``, the chunk whose first voxel is at ``corner`` (level coordinates).

        The piece is copied into this thread's chunk buffer (one per thread,
        whatever the level, reused: fresh buffers cost page faults), tested
        there, and written from it.

        Returns
        -------
        bool
            Whether a file was written (``False`` for an all-zero chunk).
        """
        data = self._buffer()
        if piece.shape == self.chunks:
            np.copyto(data, piece)
        else:
            data[...] = 0
            data[tuple(slice(0, n) for n in piece.shape)] = piece
        if not self._words(data).any():
            return False
        index = tuple(c // n for c, n in zip(corner, self.chunks, strict=True))
        key = self._prefix + self._array.metadata.encode_chunk_key(index)
        store = self._array.store
        if isinstance(store, LocalStore):
            self._write_local(Path(store.root) / key, data)
        else:
            sync(store.set(key, self._prototype.buffer.from_array_like(data.reshape(-1).view(np.uint8))))
        return True

    def _write_local(self, path: Path, data: np.ndarray) -> None:
        if self._direct:
            try:
                write_file(path, data, direct=True)
                return
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._direct = False
                log.debug("direct I/O refused for %s (%s); writing through the page cache", path, error)
        write_file(path, data)

    @staticmethod
    def _words(data: np.ndarray) -> np.ndarray:
        """``data``'s bytes as 64-bit words where they divide evenly: testing those for zero is 8 x faster."""
        flat = data.reshape(-1)
        return flat.view(np.uint64) if flat.nbytes % 8 == 0 else flat

    def _buffer(self) -> np.ndarray:
        """This thread's chunk buffer, shared by the writers of every level (one per chunk shape and dtype)."""
        buffers = getattr(_THREAD_BUFFERS, "by_kind", None)
        if buffers is None:
            buffers = _THREAD_BUFFERS.by_kind = {}
        kind = (self.chunks, self._dtype.str)
        if kind not in buffers:
            buffers[kind] = aligned_empty(self.chunks, self._dtype)
        return buffers[kind]
