"""The output store: name checks, safe replacement, and level arrays with the project's defaults.

Everything goes through zarr's store abstraction except the checks on what an
existing directory holds before it may be replaced, which look at the disk.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV2Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore

from scrollzarr.errors import ScrollzarrError, UsageError

_ZARR_MARKERS = (".zgroup", ".zarray", "zarr.json")
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
    """Whether ``path`` is a zarr array or group directory (format 2 or 3)."""
    return path.is_dir() and any((path / marker).is_file() for marker in _ZARR_MARKERS)


def check_replaceable(output: Path, overwrite: bool, input_dir: Path | None) -> None:
    """Check, before anything is written, that ``output`` may be created or replaced.

    Raises
    ------
    OutputError
        If the output exists and ``overwrite`` is false, or it exists but is
        not a zarr store or an empty directory, or it is or contains the input.
    """
    if not output.exists() and not output.is_symlink():
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
    if not (is_zarr_store(output) or not any(output.iterdir())):
        raise OutputError(
            f"output {output} exists and is not a zarr store; --overwrite only replaces zarr stores "
            "or empty directories, so move it away or choose another name"
        )


def open_store(output: Path) -> LocalStore:
    """The zarr store of the output directory."""
    return LocalStore(output)


def remove_partial_files(output: Path) -> int:
    """Delete the temporary files a stopped run left (the store writes ``*.partial``, then renames)."""
    leftovers = list(output.rglob("*.partial"))
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def remove_existing(output: Path) -> None:
    """Delete ``output`` if it exists; call only after :func:`check_replaceable`."""
    if output.exists():
        shutil.rmtree(output)


def create_level(
    parent: zarr.Group | Path, name: str | None, shape: tuple[int, ...], chunk: int, dtype: np.dtype
) -> zarr.Array:
    """Create one level: zarr format 2, cubic chunks, no compression, fill 0, ``/`` chunk keys.

    Parameters
    ----------
    parent : zarr.Group or Path
        A group to create the array ``name`` in, or a path for a plain array
        (``name`` then ``None``).
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
        return parent.create_array(name, overwrite=True, **settings)
    return zarr.create_array(str(parent), zarr_format=2, **settings)


def write_file(path: Path, data: np.ndarray) -> None:
    """Write ``data``'s bytes to ``path`` atomically: a temporary ``*.partial`` file, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(temporary, "wb") as handle:
            handle.write(memoryview(data).cast("B"))
            handle.flush()
            # Start writing it to disk now (Linux starts writeback of dirty pages on this advice), so
            # that the disk writes while the run still reads and computes instead of after it ends.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
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
        self._local = threading.local()

    def write(self, corner: tuple[int, ...], piece: np.ndarray) -> bool:
        """Store ``piece``, the chunk whose first voxel is at ``corner`` (level coordinates).

        The piece is copied into this thread's chunk buffer (reused: fresh
        buffers cost page faults), tested there, and written from it.

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
        if not data.any():
            return False
        index = tuple(c // n for c, n in zip(corner, self.chunks, strict=True))
        key = self._prefix + self._array.metadata.encode_chunk_key(index)
        store = self._array.store
        if isinstance(store, LocalStore):
            write_file(Path(store.root) / key, data)
        else:
            sync(store.set(key, self._prototype.buffer.from_array_like(data.reshape(-1).view(np.uint8))))
        return True

    def _buffer(self) -> np.ndarray:
        data = getattr(self._local, "data", None)
        if data is None:
            data = self._local.data = np.empty(self.chunks, self._dtype)
        return data
