"""Level sinks: where a conversion's voxels become files, one whole write unit at a time.

A sink takes a *write unit* of one level (a chunk, or a shard of a sharded
array: :attr:`~scrollzarr.layout.StoreLayout.unit`), leaves out what is all
zero, encodes what is not and writes it atomically (a temporary
``*.partial`` file, renamed into place).  The pipeline hands each unit to
exactly one task, so no file is ever written by two writers, and it knows
nothing of the format: :func:`open_sink` picks the implementation from the
level's :class:`~scrollzarr.layout.StoreLayout`.

* :class:`RawChunkSink`: uncompressed, unsharded (the default store); chunk
  files written straight from a page-aligned buffer with direct I/O.
* :class:`EncodedChunkSink`: compressed, unsharded; each chunk encoded by the
  writing thread (blosc, zstd and zlib release the GIL) into a page-aligned
  buffer and written from it with direct I/O too (:class:`_UnitFile`).
* :class:`ShardSink`: sharded (zarr 3), compressed or not; the inner chunks
  are encoded and appended to the shard file one at a time, then the index.

A level in an S3 bucket (its directory an :class:`~scrollzarr.storage.ObjectStore`)
gets the same bytes: each unit is gathered in memory and put as one object
(:class:`_UnitObject`; a PUT is atomic, so no temporary name).

A sink is made from plain values (:class:`SinkSpec`), so it can be opened in
any process.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import BinaryIO, Protocol

import google_crc32c
import imagecodecs
import numcodecs
import numpy as np
from numcodecs.abc import Codec

from scrollzarr.blocks import Box, Shape3
from scrollzarr.durable import DIRECT_IO_BLOCK, O_DIRECT, aligned_empty, temporary_path, thread_buffer
from scrollzarr.layout import StoreLayout
from scrollzarr.storage import ObjectStore

log = logging.getLogger(__name__)

# Direct I/O (``O_DIRECT``) needs buffers, sizes and offsets in whole blocks of the device; 4096 bytes
# covers the block sizes of today's disks.
# An inner chunk missing from a shard: offset and length both 2^64 - 1 (zarr v3 sharding_indexed).
MISSING = np.uint64(2**64 - 1)

# Each thread's chunk buffers (reused: fresh buffers cost page faults), shared by every sink.


# What gives the voxels of a box of a level (level coordinates, inside the level): a part of a write unit.
Parts = Callable[[Box], np.ndarray]


class LevelSink(Protocol):
    """What the conversion writes a level through."""

    unit: Shape3
    """Shape of a write unit, voxels (z, y, x): units start at multiples of it."""
    chunks: Shape3
    """Shape of a chunk, voxels (z, y, x): the unit, or (sharded) a part of it."""

    def write(self, corner: Shape3, piece: np.ndarray) -> int:
        """Store ``piece``, the write unit whose first voxel is at ``corner`` (level coordinates), clipped to the
        level; return how many of its chunks were not all zero (and so were stored)."""
        ...

    def write_parts(self, corner: Shape3, part: Parts) -> int:
        """Store the write unit whose first voxel is at ``corner``, asking ``part`` for the voxels of one chunk
        at a time (a box clipped to the level), so that a shard is never held whole; as :meth:`write`."""
        ...


@dataclass(frozen=True)
class SinkSpec:
    """Everything a sink needs, as plain values.

    Attributes
    ----------
    directory : Path or ObjectStore
        The level array's directory (where its metadata is), or its prefix in a bucket.
    shape : (int, int, int)
        The level's shape, z, y, x.
    dtype : str
        The voxels' numpy type (``"uint8"``, ``"uint16"``).
    layout : StoreLayout
    """

    directory: Path | ObjectStore
    shape: Shape3
    dtype: str
    layout: StoreLayout


def open_sink(spec: SinkSpec) -> LevelSink:
    """The sink for a level with ``spec``'s layout."""
    if spec.layout.shard is not None:
        return ShardSink(spec)
    if spec.layout.compressor != "none":
        return EncodedChunkSink(spec)
    return RawChunkSink(spec)


def write_file(path: Path | ObjectStore, data: np.ndarray | bytes | memoryview, direct: bool = False) -> None:
    """Write ``data``'s bytes to ``path`` atomically: a temporary ``*.partial`` file, then a rename (in a bucket:
    one object, put whole).

    Parameters
    ----------
    direct : bool
        Write with ``O_DIRECT``: straight from ``data`` to the disk, bypassing
        the page cache.  ``data`` must then be page-aligned (:func:`aligned_empty`)
        and a whole number of :data:`DIRECT_IO_BLOCK` bytes.  A file system without
        direct I/O raises ``OSError`` with ``EINVAL``.
    """
    with _open_unit(path, direct) as file:
        file.append(data)


def _open_unit(path: Path | ObjectStore, direct: bool, fallback: bool = False) -> _Partial | _UnitObject:
    """The writer of a unit file: a temporary file renamed in, or (in a bucket) one object put whole."""
    return _UnitObject(path) if isinstance(path, ObjectStore) else _Partial(path, direct, fallback)


class _Partial:
    """A file written under a temporary name and renamed into place when the ``with`` block ends without error.

    Writes with ``O_DIRECT`` while the caller asks (:meth:`append` of aligned
    whole blocks), then through the page cache; either way the file's pages
    are handed to the disk at once (``POSIX_FADV_DONTNEED``: Linux starts their
    writeback), so that the disk writes while the run still reads and computes.
    """

    def __init__(self, path: Path, direct: bool, fallback: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.temporary = temporary_path(path)
        self.direct = direct
        self.fallback = fallback
        self.refused = False  # whether direct I/O was refused and the file written through the page cache
        self.descriptor = -1
        self.descriptor = self._open()
        self.size = 0

    def _open(self) -> int:
        """Open (create, empty) the temporary file, with ``O_DIRECT`` if :attr:`direct`; with :attr:`fallback`,
        without it if the file system refuses it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            return os.open(self.temporary, flags | (O_DIRECT if self.direct else 0), 0o666)
        except OSError as error:
            if not (self.direct and self.fallback and error.errno == errno.EINVAL):
                raise
            self.direct, self.refused = False, True
            return os.open(self.temporary, flags, 0o666)

    def append(self, data: np.ndarray | bytes | memoryview) -> None:
        view = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        if self.direct and len(view) % DIRECT_IO_BLOCK:  # the rest goes through the page cache
            os.close(self.descriptor)
            self.descriptor = os.open(self.temporary, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self.direct = False
        done = 0
        while done < len(view):
            try:
                done += os.write(self.descriptor, view[done:])
            except OSError as error:
                # refused before a byte was written: the same file again, through the page cache
                if not (self.direct and self.fallback and error.errno == errno.EINVAL and self.size == done == 0):
                    raise
                os.close(self.descriptor)
                self.descriptor = -1
                self.direct, self.refused = False, True
                self.descriptor = self._open()
        self.size += done

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes (the padding of a last direct-I/O block)."""
        os.ftruncate(self.descriptor, size)

    def __enter__(self) -> _Partial:
        return self

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        if self.descriptor < 0:  # ended already (an error after the rename was tried): nothing left to undo
            return
        try:
            if error is None and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(self.descriptor)
            self.descriptor = -1
        if error is None:
            try:
                os.replace(self.temporary, self.path)
                return
            except BaseException:
                self.temporary.unlink(missing_ok=True)
                raise
        self.temporary.unlink(missing_ok=True)


class _UnitObject:
    """A unit written to an object store: its bytes gathered in memory, put as one object when the ``with``
    block ends without error (an object PUT is atomic: no temporary name).  The same calls as :class:`_Partial`."""

    def __init__(self, location: ObjectStore) -> None:
        self.location = location
        self.path = location
        self.data = bytearray()
        self.direct = False
        self.refused = False  # as _Partial's: a bucket has no direct I/O to refuse

    @property
    def size(self) -> int:
        return len(self.data)

    def append(self, data: np.ndarray | bytes | memoryview) -> None:
        self.data += (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")

    def truncate(self, size: int) -> None:
        del self.data[size:]

    def __enter__(self) -> _UnitObject:
        return self

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        if error is None:
            self.location.put("", bytes(self.data))
        self.data = bytearray()


def _chunk_buffer(chunks: Shape3, dtype: np.dtype) -> np.ndarray:
    """This thread's page-aligned buffer for one chunk of ``dtype``, shared by the sinks of every level."""
    return thread_buffer((chunks, np.dtype(dtype).str), lambda: aligned_empty(chunks, dtype))


# Blosc's worst case: the data stored as is, behind its 16-byte header.
BLOSC_OVERHEAD = 16


def encoded_bound(chunk_bytes: int) -> int:
    """Most bytes a chunk of ``chunk_bytes`` can take encoded, with any of our codecs.

    Blosc adds :data:`BLOSC_OVERHEAD`; zstd's ``ZSTD_compressBound`` is under
    ``n + n / 256 + 128`` and zlib's ``deflateBound`` (with the gzip wrapper) under
    ``n + n / 1024 + 32``, for incompressible data.
    """
    return chunk_bytes + chunk_bytes // 128 + DIRECT_IO_BLOCK


def _encoder(codec: Codec) -> Callable[[np.ndarray, np.ndarray], int]:
    """What encodes a padded chunk with ``codec`` in the calling thread: ``encode(data, out)`` puts the
    encoded bytes at the start of ``out`` (uint8, at least :func:`encoded_bound` bytes) and returns their count.

    Blosc goes through imagecodecs' binding of the same c-blosc (1.21) straight
    into ``out``: the bytes are identical to numcodecs' (checked by
    tests/test_formats.py's test_shards_hold_what_zarr_python_writes and
    tests/test_sink_direct_io.py), but numcodecs allocates a fresh output per
    chunk and fresh pages cost page faults: 4 MiB uint16 chunks of the synthetic
    scroll on the build machine, blosc lz4 (bit shuffle) 646 MB/s with numcodecs,
    1552 MB/s with a reused buffer; zstd 3, 249 and 309 MB/s.  Zstd and zlib
    spend their time compressing (numcodecs and imagecodecs alike, 262 and 257
    MB/s for zstd 3): their output is copied into ``out``.

    Gzip is written with a header time of 0: numcodecs' GZip puts the time of the
    write in each chunk's header, so a resumed run's chunks differed from an
    uninterrupted run's (tests/test_formats_resume.py) though their voxels did not.
    """
    if not isinstance(codec, numcodecs.Blosc):
        if isinstance(codec, numcodecs.GZip):
            level = codec.level

            def compress(data: np.ndarray) -> bytes:
                # as numcodecs' GZip writes it (GzipFile: the header's OS byte is 3, gzip.compress' 255), time 0
                stream = io.BytesIO()
                with gzip.GzipFile(mode="wb", compresslevel=level, fileobj=stream, mtime=0) as file:
                    file.write(data.data)
                return stream.getvalue()

        else:
            compress = codec.encode

        def copy(data: np.ndarray, out: np.ndarray) -> int:
            encoded = np.frombuffer(compress(data), np.uint8)
            out[: len(encoded)] = encoded
            return len(encoded)

        return copy

    def encode(data: np.ndarray, out: np.ndarray) -> int:
        # exactly numcodecs' room: with more, c-blosc keeps an encoding longer than the data instead of a copy
        room = out[: data.nbytes + BLOSC_OVERHEAD]
        # imagecodecs' stubs take bytes in and a bytearray out; blosc_encode takes any buffer for either
        encoded = imagecodecs.blosc_encode(
            data, level=codec.clevel, compressor=codec.cname, shuffle=codec.shuffle,  # type: ignore[arg-type]
            typesize=data.dtype.itemsize, blocksize=codec.blocksize, numthreads=1, out=room,  # type: ignore[arg-type]
        )  # fmt: skip
        return len(encoded)

    return encode


class _UnitFile:
    """A unit file written with direct I/O from this thread's page-aligned buffer, whatever its pieces' sizes.

    Encoded pieces go into the buffer one after another; after each, the whole
    blocks held are written (:data:`DIRECT_IO_BLOCK`) and the rest (less than a
    block) moves to the buffer's start.  :meth:`close` writes the last bytes
    padded to a whole block, then cuts the file to its size.  Written through
    the page cache, 2 GiB of blosc-zstd chunks cost the writer threads 2.2 s of
    CPU against 4.0 s for encoding them (synthetic scroll, 2-core build machine):
    the copy into the page cache, which direct I/O leaves out.

    Parameters
    ----------
    room : int
        Most bytes one piece may take (:func:`encoded_bound`, or an index's size).
    """

    def __init__(self, path: Path | ObjectStore, direct: bool, room: int, fallback: bool = False) -> None:
        size = -(-(room + DIRECT_IO_BLOCK) // DIRECT_IO_BLOCK) * DIRECT_IO_BLOCK
        self.buffer = thread_buffer(("unit file", size), lambda: aligned_empty((size,), np.dtype(np.uint8)))
        self.file = _open_unit(path, direct, fallback)
        self.held = 0  # bytes at the buffer's start not yet written

    @property
    def size(self) -> int:
        """Bytes of the file so far (written or held)."""
        return self.file.size + self.held

    def add(self, data: np.ndarray, encode: Callable[[np.ndarray, np.ndarray], int] | None) -> int:
        """Append ``data`` encoded with ``encode`` (as is for ``None``); return the bytes appended."""
        if encode is None and self.held == 0 and data.nbytes % DIRECT_IO_BLOCK == 0:  # straight from ``data``
            self.file.append(data)
            return data.nbytes
        if encode is None:
            count = data.nbytes
            self.buffer[self.held : self.held + count] = memoryview(data.data).cast("B")
        else:
            count = encode(data, self.buffer[self.held :])
        self.held += count
        whole = self.held - self.held % DIRECT_IO_BLOCK
        if whole:
            self.file.append(self.buffer[:whole])
            rest = self.held - whole
            self.buffer[:rest] = self.buffer[whole : self.held]
            self.held = rest
        return count

    def close(self) -> None:
        """Write what is held, padded to a whole block; cut the file to its size; rename it into place."""
        size = self.size
        if self.held:
            self.file.append(self.buffer[: -(-self.held // DIRECT_IO_BLOCK) * DIRECT_IO_BLOCK])
            self.file.truncate(size)
            self.held = 0
        self.file.__exit__(None, None, None)

    def abort(self, error: BaseException) -> None:
        """Remove the temporary file, after ``error``."""
        self.file.__exit__(type(error), error, None)


def _padded(piece: np.ndarray, chunks: Shape3, dtype: np.dtype) -> np.ndarray | None:
    """``piece`` (a chunk, clipped at the level's far edges) copied into this thread's buffer and padded with
    zeros to the whole chunk, as zarr stores edge chunks; ``None`` if it is all zero."""
    return _pad_into(piece, _chunk_buffer(chunks, dtype))


def _pad_into(piece: np.ndarray, data: np.ndarray) -> np.ndarray | None:
    """``piece`` copied into ``data`` (a whole chunk) and padded with zeros; ``data``, or ``None`` if all zero."""
    chunks = data.shape
    if piece.shape == chunks:
        np.copyto(data, piece)
    else:
        data[...] = 0
        data[tuple(slice(0, n) for n in piece.shape)] = piece
    flat = data.reshape(-1)
    # testing 64-bit words for zero is 8 x faster than bytes
    words = flat.view(np.uint64) if flat.nbytes % 8 == 0 else flat
    return data if words.any() else None


class UnitAssembly(Protocol):
    """A unit file put together from its chunks, prepared elsewhere (:meth:`PooledSink.prepare`), in order."""

    def add(self, inner: Shape3, data: np.ndarray) -> None:
        """Append the stored bytes ``data`` (uint8) of the chunk at ``inner`` (its index in the unit)."""
        ...

    def finish(self) -> int:
        """Write what is left (a shard's index) and rename the file into place; the chunks stored (0: no file)."""
        ...

    def abort(self, error: BaseException) -> None:
        """Remove the temporary file, after ``error``."""
        ...


class PooledSink(Protocol):
    """A sink whose units can be written in two steps, so that other threads encode while one waits for the disk:
    each chunk prepared (padded, tested for zeros, encoded) by any thread into a buffer of
    :attr:`buffer_bytes`, then the unit's file assembled from the prepared chunks in order, by one thread.
    The bytes are those :meth:`LevelSink.write` stores."""

    unit: Shape3
    chunks: Shape3

    @property
    def buffer_bytes(self) -> int:
        """Bytes of a buffer that :meth:`prepare` fills: the most a chunk can take stored."""
        ...

    def chunk_boxes(self, corner: Shape3) -> list[tuple[Shape3, Box]]:
        """The chunks of the unit at ``corner`` inside the level, in the order they are stored: each one's index
        in the unit and its box (level coordinates, clipped to the level)."""
        ...

    def prepare(self, piece: np.ndarray, out: np.ndarray) -> int:
        """Pad ``piece`` (a chunk's voxels, clipped at the level's far edges) to the whole chunk and, unless it is
        all zero, put its stored bytes at the start of ``out`` (page-aligned uint8, :attr:`buffer_bytes`);
        their count, 0 for an all-zero chunk."""
        ...

    def assemble(self, corner: Shape3) -> UnitAssembly:
        """The file of the unit at ``corner``, to :meth:`UnitAssembly.add` its prepared chunks to; it is opened
        with the first."""
        ...


def pooled(sink: LevelSink) -> PooledSink | None:
    """``sink`` if its units are better written in two steps (compressed or sharded: encoding or many chunks
    to a unit), else ``None`` (uncompressed chunks: the writer's copy is all the work there is)."""
    if isinstance(sink, CheckedSink):
        inner = pooled(sink.sink)
        return None if inner is None else _CheckedPooled(inner, sink.check)
    return sink if isinstance(sink, (EncodedChunkSink, ShardSink)) else None


class CheckedSink:
    """``sink``, calling ``check`` before it writes each unit (a Dask task checks that its run still owns the
    store: :func:`scrollzarr.tasks.run_task`); ``check`` raises to stop the writing."""

    def __init__(self, sink: LevelSink, check: Callable[[], None]) -> None:
        self.sink, self.check = sink, check
        self.unit, self.chunks = sink.unit, sink.chunks

    def write(self, corner: Shape3, piece: np.ndarray) -> int:
        self.check()
        return self.sink.write(corner, piece)

    def write_parts(self, corner: Shape3, part: Parts) -> int:
        self.check()
        return self.sink.write_parts(corner, part)


class _CheckedPooled:
    """A :class:`PooledSink` that calls ``check`` before it assembles each unit (:class:`CheckedSink`'s)."""

    def __init__(self, sink: PooledSink, check: Callable[[], None]) -> None:
        self.sink, self.check = sink, check
        self.unit, self.chunks = sink.unit, sink.chunks

    @property
    def buffer_bytes(self) -> int:
        return self.sink.buffer_bytes

    def chunk_boxes(self, corner: Shape3) -> list[tuple[Shape3, Box]]:
        return self.sink.chunk_boxes(corner)

    def prepare(self, piece: np.ndarray, out: np.ndarray) -> int:
        return self.sink.prepare(piece, out)

    def assemble(self, corner: Shape3) -> UnitAssembly:
        self.check()
        return self.sink.assemble(corner)


class _Sink:
    """What every sink shares: its unit, the unit files' names, and direct I/O until the file system refuses it.

    The first refusal of direct I/O (``EINVAL``, e.g. tmpfs) switches the sink
    to ordinary writes for good.
    """

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.unit: Shape3 = spec.layout.unit
        self.chunks: Shape3 = (spec.layout.chunk,) * 3
        self.dtype = np.dtype(spec.dtype).newbyteorder("<")
        self._direct = bool(O_DIRECT) and isinstance(spec.directory, Path)  # not to a bucket

    def _refused(self, file: _UnitFile) -> None:
        """Note that ``file``'s file system refused direct I/O (it was written through the page cache)."""
        if file.file.refused and self._direct:
            self._direct = False
            log.debug("direct I/O refused for %s; writing through the page cache", file.file.path)

    def path(self, corner: Shape3) -> Path | ObjectStore:
        """The file of the unit whose first voxel is at ``corner``."""
        index = tuple(c // n for c, n in zip(corner, self.unit, strict=True))
        return self.spec.directory / self.spec.layout.chunk_key(index)

    def unit_box(self, corner: Shape3) -> Box:
        """The unit whose first voxel is at ``corner``, clipped to the level."""
        z, y, x = ((c, min(c + n, size)) for c, n, size in zip(corner, self.unit, self.spec.shape, strict=True))
        return z, y, x

    def _attempt(self, path: Path | ObjectStore, write: Callable[[bool], int]) -> int:
        """``write(direct)``: with direct I/O while the file system allows it, else through the page cache."""
        if self._direct:
            try:
                return write(True)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._direct = False
                log.debug("direct I/O refused for %s (%s); writing through the page cache", path, error)
        return write(False)

    def write_parts(self, corner: Shape3, part: Parts) -> int:
        """The unit of an unsharded level is one chunk: one part."""
        return self.write(corner, part(self.unit_box(corner)))

    def write(self, corner: Shape3, piece: np.ndarray) -> int:
        """An unsharded unit: one chunk, padded, left out if all zero, else stored by :meth:`_store`."""
        data = _padded(piece, self.unit, self.dtype)
        if data is None:
            return 0
        path = self.path(corner)
        return self._attempt(path, lambda direct: self._store(path, data, direct))

    def _store(self, path: Path | ObjectStore, data: np.ndarray, direct: bool) -> int:
        """Write the padded chunk ``data`` to ``path`` (with direct I/O if ``direct``); 1, the chunks stored."""
        raise NotImplementedError


class RawChunkSink(_Sink):
    """Uncompressed chunks, a file each: the voxels in C order, little-endian, padded to the whole chunk.

    Where the file system allows it, chunk files are written with direct I/O: to
    the disk the same bytes, without copying them into the page cache first (on
    the benchmark machine that copy took 40 % of the conversion's CPU time).
    """

    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self._direct = self._direct and math.prod(self.unit) * self.dtype.itemsize % DIRECT_IO_BLOCK == 0

    def _store(self, path: Path | ObjectStore, data: np.ndarray, direct: bool) -> int:
        write_file(path, data, direct=direct)
        return 1


class EncodedChunkSink(_Sink):
    """Compressed chunks, a file each: the padded chunk's bytes through the layout's codec, written with direct
    I/O where the file system allows it (:class:`_UnitFile`)."""

    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        codec = spec.layout.codec(self.dtype)
        assert codec is not None
        self.encode = _encoder(codec)
        self.room = encoded_bound(math.prod(self.unit) * self.dtype.itemsize)

    def _store(self, path: Path | ObjectStore, data: np.ndarray, direct: bool) -> int:
        file = _UnitFile(path, direct, self.room)
        try:
            file.add(data, self.encode)
            file.close()
        except BaseException as error:
            file.abort(error)
            raise
        return 1

    @property
    def buffer_bytes(self) -> int:
        return self.room

    def chunk_boxes(self, corner: Shape3) -> list[tuple[Shape3, Box]]:
        return [((0, 0, 0), self.unit_box(corner))]

    def prepare(self, piece: np.ndarray, out: np.ndarray) -> int:
        data = _padded(piece, self.unit, self.dtype)
        return 0 if data is None else self.encode(data, out)

    def assemble(self, corner: Shape3) -> UnitAssembly:
        return _ShardFile(self, self.path(corner), self._direct, None, self.room, fallback=True)


class ShardSink(_Sink):
    """Shards of a zarr 3 array: each a file of its non-zero inner chunks, then the index.

    The file is laid out as zarr's ``sharding_indexed`` codec specifies with its
    default index, and as zarr-python reads it: the encoded inner chunks one
    after another (in C order; zarr-python writes them in Morton order, which
    readers do not see), then for every inner chunk of the shard, in C order,
    its offset and length (two little-endian uint64; both 2^64 - 1 for a chunk
    left out), then the CRC-32C of those index bytes (little-endian uint32).  A
    shard with no non-zero chunk is not written.  The file goes out with direct
    I/O where the file system allows it (:class:`_UnitFile`): uncompressed inner
    chunks straight from the chunk buffer, encoded ones from the buffer they are
    encoded into.

    Built here rather than by zarr's sharding codec because it measured faster
    (bench/bench_shard_write.py: one 128 x 1024 x 1024 uint16 shard of the
    synthetic scroll, ``sink.write`` against ``array[...] =`` with zarr 3.1.6's
    defaults, best of two, two runs): 340-440 ms against 633-1002 ms
    uncompressed, 929-978 against 988-1118 ms with blosc-zstd 3, 427-529
    against 878-1029 ms with blosc-lz4; and zarr would test each inner chunk for
    zeros again.
    """

    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        assert spec.layout.shard is not None
        codec = spec.layout.codec(self.dtype)
        gz, gy, gx = (s // c for s, c in zip(self.unit, self.chunks, strict=True))
        self.grid: Shape3 = (gz, gy, gx)
        nbytes = math.prod(self.chunks) * self.dtype.itemsize
        self.encode = None if codec is None else _encoder(codec)
        index_bytes = 16 * math.prod(self.grid) + 4
        # whole-block uncompressed chunks go straight from the chunk buffer: the unit file's buffer holds the index
        whole = codec is None and nbytes % DIRECT_IO_BLOCK == 0
        self.room = index_bytes if whole else max(encoded_bound(nbytes), index_bytes)

    def write(self, corner: Shape3, piece: np.ndarray) -> int:
        def part(box: Box) -> np.ndarray:
            return piece[tuple(slice(a - c, b - c) for (a, b), c in zip(box, corner, strict=True))]

        return self.write_parts(corner, part)

    def write_parts(self, corner: Shape3, part: Parts) -> int:
        path = self.path(corner)
        return self._attempt(path, lambda direct: self._write(path, corner, part, direct))

    def _write(self, path: Path | ObjectStore, corner: Shape3, part: Parts, direct: bool) -> int:
        shard = _ShardFile(self, path, direct, self.grid, self.room)
        try:
            for inner, box in self.chunk_boxes(corner):
                data = _padded(part(box), self.chunks, self.dtype)
                if data is not None:
                    shard.add(inner, data, self.encode)
            return shard.finish()
        except BaseException as error:
            shard.abort(error)
            raise

    def chunk_boxes(self, corner: Shape3) -> list[tuple[Shape3, Box]]:
        boxes = []
        for inner in product(*(range(n) for n in self.grid)):
            starts = (c + i * n for c, i, n in zip(corner, inner, self.chunks, strict=True))
            z, y, x = ((a, min(a + n, size)) for a, n, size in zip(starts, self.chunks, self.spec.shape, strict=True))
            if z[0] < z[1] and y[0] < y[1] and x[0] < x[1]:  # else beyond the level's far edge
                boxes.append(((inner[0], inner[1], inner[2]), (z, y, x)))
        return boxes

    @property
    def buffer_bytes(self) -> int:
        nbytes = math.prod(self.chunks) * self.dtype.itemsize
        return nbytes if self.encode is None else encoded_bound(nbytes)

    def prepare(self, piece: np.ndarray, out: np.ndarray) -> int:
        if self.encode is None:  # uncompressed: padded straight into ``out``, written from there
            nbytes = math.prod(self.chunks) * self.dtype.itemsize
            data = _pad_into(piece, out[:nbytes].view(self.dtype).reshape(self.chunks))
            return 0 if data is None else nbytes
        data = _padded(piece, self.chunks, self.dtype)
        return 0 if data is None else self.encode(data, out)

    def assemble(self, corner: Shape3) -> UnitAssembly:
        return _ShardFile(self, self.path(corner), self._direct, self.grid, self.room, fallback=True)


class _ShardFile:
    """A unit file assembled a chunk at a time: a shard (its chunks, then its index) or, without a ``grid``, one
    compressed chunk.  The file is opened with the first chunk added, so a unit of no chunk leaves none.

    Parameters
    ----------
    sink : _Sink
        The sink it belongs to: told when the file system refused direct I/O (``fallback``).
    grid : (int, int, int) or None
        Chunks along z, y and x of a shard; ``None`` for a unit of one chunk, which has no index.
    room : int
        Most bytes one addition may take (:class:`_UnitFile`).
    fallback : bool
        Write through the page cache where the file system refuses direct I/O (else ``EINVAL`` is raised).
    """

    def __init__(
        self,
        sink: _Sink,
        path: Path | ObjectStore,
        direct: bool,
        grid: Shape3 | None,
        room: int,
        fallback: bool = False,
    ) -> None:
        self.sink, self.path, self.direct, self.room, self.fallback = sink, path, direct, room, fallback
        self.grid = grid
        self.entries = None if grid is None else np.full((*grid, 2), MISSING, dtype="<u8")
        self.file: _UnitFile | None = None
        self.stored = 0

    def add(
        self, inner: Shape3, data: np.ndarray, encode: Callable[[np.ndarray, np.ndarray], int] | None = None
    ) -> None:
        """Append chunk ``inner``: ``data`` encoded with ``encode``, or as is (its stored bytes) for ``None``."""
        if self.file is None:
            self.file = _UnitFile(self.path, self.direct, self.room, self.fallback)
        offset = self.file.size
        length = self.file.add(data, encode)
        if self.entries is not None:
            self.entries[inner] = (offset, length)
        self.stored += 1

    def finish(self) -> int:
        if self.file is None:
            return 0
        if self.entries is not None:
            index = self.entries.tobytes()
            tail = index + np.uint32(google_crc32c.value(index)).astype("<u4").tobytes()
            self.file.add(np.frombuffer(tail, np.uint8), None)
        self.file.close()
        self.sink._refused(self.file)
        return self.stored

    def abort(self, error: BaseException) -> None:
        if self.file is not None:
            self.file.abort(error)


def damage(path: Path, spec: SinkSpec, decode: bool = False) -> str | None:
    """What is wrong with the unit file ``path`` of the level ``spec`` describes, or ``None`` if nothing shows.

    An uncompressed chunk must be exactly one padded chunk long.  A shard's
    index must be there with its checksum, and point inside the file at chunks
    of that length (uncompressed).  A compressed chunk must end where its
    compressed format says it ends (:func:`_frame_damage`: a few bytes read);
    with ``decode`` (a read of the whole file) it must decode to one chunk.
    """
    layout = spec.layout
    chunk_bytes = layout.chunk**3 * np.dtype(spec.dtype).itemsize
    size = path.stat().st_size
    if layout.shard is not None:
        return _shard_damage(path, size, spec, chunk_bytes, decode)
    if layout.compressor == "none":
        return None if size == chunk_bytes else f"{size} bytes, not {chunk_bytes}"
    if decode:
        return _decode_damage(path.read_bytes(), spec, chunk_bytes)
    with path.open("rb") as file:
        return _frame_damage(file, size, layout.compressor, chunk_bytes)


def _frame_damage(file: BinaryIO, size: int, compressor: str, chunk_bytes: int) -> str | None:
    """What the framing of a compressed chunk file of ``size`` bytes says is wrong with it, or ``None``.

    Reads a few bytes, not the chunk: blosc's header gives the compressed and
    the decoded size; a gzip stream ends with the decoded size (modulo 2^32); a
    zstd frame is a chain of block headers, walked to its end.  So a file cut
    short (a write under its final name that a power cut stopped before it was
    flushed) is found without decoding the level: tests/test_formats_resume.py.
    """
    head = file.read(16)
    if compressor.startswith("blosc-"):
        if len(head) < 16:
            return f"{size} bytes, shorter than blosc's header"
        nbytes, cbytes = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
        if nbytes != chunk_bytes or cbytes != size:
            return f"its blosc header gives {cbytes} bytes holding {nbytes}, the file has {size} for {chunk_bytes}"
        return None
    if compressor == "gzip":
        file.seek(max(size - 4, 0))
        if head[:2] != b"\x1f\x8b" or size < 18 or int.from_bytes(file.read(4), "little") != chunk_bytes % 2**32:
            return f"it does not end as a gzip stream of {chunk_bytes} bytes"
        return None
    # zstd (RFC 8878): magic, frame header descriptor, window, dictionary id, content size, blocks, checksum
    if len(head) < 5 or head[:4] != b"\x28\xb5\x2f\xfd":
        return "it does not start as a zstd frame"
    descriptor = head[4]
    single = descriptor >> 5 & 1
    offset = 5 + (1 - single) + (0, 1, 2, 4)[descriptor & 3] + (single, 2, 4, 8)[descriptor >> 6]
    while True:
        file.seek(offset)
        header = file.read(3)
        if len(header) < 3:
            return f"its zstd frame is cut short: a block at byte {offset}, the file has {size}"
        value = int.from_bytes(header, "little")
        offset += 3 + (1 if value >> 1 & 3 == 1 else value >> 3)
        if value & 1:
            break
    end = offset + 4 * (descriptor >> 2 & 1)
    return None if end == size else f"its zstd frame ends at byte {end}, the file has {size}"


def _decode_damage(encoded: bytes, spec: SinkSpec, chunk_bytes: int) -> str | None:
    """What is wrong with a compressed chunk's bytes, decoded, or ``None``."""
    codec = spec.layout.codec(np.dtype(spec.dtype))
    assert codec is not None
    try:
        decoded = len(memoryview(codec.decode(encoded)).cast("B"))
    except Exception as error:  # numcodecs raises RuntimeError, ValueError, zlib.error, ...
        return f"cannot be decoded as {spec.layout.compressor}: {error}"
    return None if decoded == chunk_bytes else f"decodes to {decoded} bytes, not {chunk_bytes}"


def _shard_damage(path: Path, size: int, spec: SinkSpec, chunk_bytes: int, decode: bool) -> str | None:
    """What is wrong with the shard file ``path`` of ``size`` bytes (its inner chunks decoded with ``decode``)."""
    assert spec.layout.shard is not None
    count = math.prod(s // spec.layout.chunk for s in spec.layout.shard)
    index_bytes = 16 * count + 4
    if size < index_bytes:
        return f"{size} bytes, shorter than its index of {index_bytes}"
    with path.open("rb") as file:
        file.seek(size - index_bytes)
        tail = file.read(index_bytes)
    index, checksum = tail[:-4], int.from_bytes(tail[-4:], "little")
    if google_crc32c.value(index) != checksum:
        return "its index's checksum does not match"
    entries = np.frombuffer(index, "<u8").reshape(count, 2)
    stored = entries[entries[:, 0] != MISSING]
    if np.any(stored[:, 0] + stored[:, 1] > size - index_bytes):
        return "its index points past the chunks"
    if spec.layout.compressor == "none" and np.any(stored[:, 1] != chunk_bytes):
        return f"its index gives chunks other than {chunk_bytes} bytes"
    if decode and spec.layout.compressor != "none":
        with path.open("rb") as file:
            for offset, length in stored.tolist():
                file.seek(offset)
                problem = _decode_damage(file.read(length), spec, chunk_bytes)
                if problem is not None:
                    return f"an inner chunk at byte {offset} {problem}"
    return None
