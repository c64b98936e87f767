"""A bounded, thread-safe cache of a zarr array's decoded chunks, and boxes of voxels cut from them.

Chunks are read through the array (so any zarr format, codec and sharding
works; uncompressed chunk files on disk are read straight into memory), each
at most once while it stays cached (a chunk that cannot be read is reported by
its file: its own, or its shard's), edge chunks padded with zeros to the whole
chunk shape; all-zero chunks are remembered without their voxels. The least
recently used chunks leave first once the cached voxels exceed the bound. A
chunk is zarr's (inner) chunk, ``array.chunks``, in a sharded array too: a
shard can be far larger than the cache, and zarr reads one chunk of a shard
without the rest.
"""

from __future__ import annotations

import gzip
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from scrollzarr.blocks import shape3
from scrollzarr.errors import ScrollzarrError
from scrollzarr.layout import UnsupportedLayout
from scrollzarr.sinks import SinkSpec, damage
from scrollzarr.store import DamagedChunkError, chunk_file, chunk_nbytes, sink_spec

ChunkIndex = tuple[int, int, int]


@dataclass(frozen=True)
class ChunkTable:
    """The cached chunks around a box of voxels, for a kernel to read them in place.

    Attributes
    ----------
    origin : ndarray, shape (3,), int64
        Chunk index (z, y, x) of ``slots[0, 0, 0]``.
    slots : ndarray, shape (nz, ny, nx), int32
        For each chunk, its position in ``arrays``; -1 if all its voxels are 0.
    arrays : list of ndarray, each shape ``shape``, C-contiguous
        The chunks' voxels (edge chunks padded with zeros).
    shape : (int, int, int)
        The chunk shape.
    """

    origin: np.ndarray
    slots: np.ndarray
    arrays: list[np.ndarray]
    shape: tuple[int, int, int]


@dataclass
class CacheStats:
    """What the cache read.

    Attributes
    ----------
    reads : int
        Chunks read from the store (a chunk evicted and needed again counts again).
    distinct : set of ChunkIndex
        Different chunks read.
    nbytes_read : int
        Decoded bytes of those reads.
    """

    reads: int = 0
    distinct: set[ChunkIndex] = field(default_factory=set)
    nbytes_read: int = 0


class ChunkCache:
    """Decoded chunks of ``array``, at most ``max_bytes`` of voxels kept.

    Parameters
    ----------
    array : zarr.Array
        A 3-D array.
    max_bytes : int
        Bound on the bytes of cached chunks.
    """

    def __init__(self, array: zarr.Array, max_bytes: int) -> None:
        self.array = array
        self.max_bytes = max_bytes
        self.chunks = shape3(array.chunks)
        self.shape = shape3(array.shape)
        self.stats = CacheStats()
        self._cached: OrderedDict[ChunkIndex, np.ndarray | None] = OrderedDict()
        self._loading: dict[ChunkIndex, Future[np.ndarray | None]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._framed = _framed(array)
        self._raw = _raw(array)
        self._counting = threading.local()
        self._fetcher: ThreadPoolExecutor | None = None

    @contextmanager
    def counting(self, stats: CacheStats) -> Iterator[None]:
        """Also count into ``stats`` the chunks this thread reads meanwhile.

        The cache of a process is shared by the tasks it runs (the bands of a
        ``ppm_to_layers`` render): each counts its own reads, and a run adds
        them up.  A chunk is counted by the task whose thread read it, not by
        those that waited for it or found it cached.
        """
        previous = getattr(self._counting, "stats", None)
        self._counting.stats = stats
        try:
            yield
        finally:
            self._counting.stats = previous

    def chunk(self, index: ChunkIndex) -> np.ndarray | None:
        """The voxels of chunk ``index`` (edge chunks padded with zeros to the chunk shape), or ``None`` if all
        are zero."""
        with self._lock:
            if index in self._cached:
                self._cached.move_to_end(index)
                return self._cached[index]
            pending = self._loading.get(index)
            if pending is None:
                pending = self._loading[index] = Future()
                loader = True
            else:
                loader = False
        if not loader:
            return pending.result()
        try:
            data = self._read(index)
        except BaseException as error:
            with self._lock:
                del self._loading[index]
            pending.set_exception(error)
            raise
        with self._lock:
            del self._loading[index]
            self._cached[index] = data
            self._bytes += 0 if data is None else data.nbytes
            while self._bytes > self.max_bytes and len(self._cached) > 1:
                _, old = self._cached.popitem(last=False)
                self._bytes -= 0 if old is None else old.nbytes
        pending.set_result(data)
        return data

    def box(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The voxels ``[lo, hi)`` (z, y, x), zero where the box reaches outside the array.

        Returns
        -------
        ndarray, shape hi - lo, the array's dtype, C-contiguous
        """
        out = np.zeros(tuple(int(h - lo_) for lo_, h in zip(lo, hi, strict=True)), dtype=self.array.dtype)
        inner_lo = [max(int(a), 0) for a in lo]
        inner_hi = [min(int(b), n) for b, n in zip(hi, self.shape, strict=True)]
        for index in self.chunks_of(lo, hi):
            data = self.chunk(index)
            if data is None:
                continue
            start = [i * c for i, c in zip(index, self.chunks, strict=True)]
            a = [max(s, x) for s, x in zip(start, inner_lo, strict=True)]
            b = [min(s + n, x) for s, n, x in zip(start, data.shape, inner_hi, strict=True)]
            out[tuple(slice(x - int(o), y - int(o)) for x, y, o in zip(a, b, lo, strict=True))] = data[
                tuple(slice(x - s, y - s) for x, y, s in zip(a, b, start, strict=True))
            ]
        return out

    def table(self, lo: np.ndarray, hi: np.ndarray) -> ChunkTable:
        """The chunks that hold voxels of the box ``[lo, hi)`` (z, y, x), read if need be; none if it lies outside
        the array."""
        indices = self.chunks_of(lo, hi)
        first = indices[0] if indices else (0, 0, 0)
        count = tuple(b - a + 1 for a, b in zip(first, indices[-1], strict=True)) if indices else (0, 0, 0)
        slots = np.full(count, -1, np.int32)
        arrays: list[np.ndarray] = []
        for index in indices:
            data = self.chunk(index)
            if data is not None:
                slots[tuple(i - f for i, f in zip(index, first, strict=True))] = len(arrays)
                arrays.append(data)
        return ChunkTable(np.array(first, np.int64), slots, arrays, self.chunks)

    def chunks_of(self, lo: np.ndarray, hi: np.ndarray) -> list[ChunkIndex]:
        """The chunks that hold voxels of the box ``[lo, hi)`` (z, y, x), in C order (none if it lies outside)."""
        inner_lo = [max(int(a), 0) for a in lo]
        inner_hi = [min(int(b), n) for b, n in zip(hi, self.shape, strict=True)]
        if any(a >= b for a, b in zip(inner_lo, inner_hi, strict=True)):
            return []
        rz, ry, rx = (range(a // c, (b - 1) // c + 1) for a, b, c in zip(inner_lo, inner_hi, self.chunks, strict=True))
        return list(product(rz, ry, rx))

    def prefetch(
        self, indices: Iterable[ChunkIndex], fetches: int, stats: CacheStats
    ) -> list[Future[np.ndarray | None]]:
        """Start reading ``indices`` that are neither cached nor being read, on at most ``fetches`` threads of the
        cache's own, counted into ``stats``; the futures of the reads started (their errors are raised again to
        whoever needs the chunk).

        For a volume on a web server or in a bucket: a tile's thread waiting for
        its chunks one at a time would wait a round trip for each.
        """
        with self._lock:
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(fetches, thread_name_prefix="prefetch")
            fetcher = self._fetcher
            wanted = [index for index in indices if index not in self._cached and index not in self._loading]
        return [fetcher.submit(self._quietly, index, stats) for index in wanted]

    def _quietly(self, index: ChunkIndex, stats: CacheStats) -> np.ndarray | None:
        try:
            with self.counting(stats):
                return self.chunk(index)
        except Exception:  # raised again, to the tile that needs the chunk, when it reads it itself
            return None

    def _read(self, index: ChunkIndex) -> np.ndarray | None:
        region = tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape, strict=True)
        )
        data = self._read_raw(index, region) if self._raw else self._decode(index, region)
        task = getattr(self._counting, "stats", None)
        with self._lock:
            for stats in (self.stats,) if task is None else (self.stats, task):
                stats.reads += 1
                stats.distinct.add(index)
                stats.nbytes_read += math.prod(r.stop - r.start for r in region) * data.itemsize
        if not data.any():
            return None
        if data.shape == self.chunks:
            return data
        whole = np.zeros(self.chunks, data.dtype)
        whole[tuple(slice(0, n) for n in data.shape)] = data
        return whole

    def _read_raw(self, index: ChunkIndex, region: tuple[slice, ...]) -> np.ndarray:
        """Chunk ``index`` of an array whose chunk files hold its voxels as they are: read straight into the
        array (zarr took 5.5 ms a chunk of 128³ uint16 from the page cache, on its own event loop's thread, where
        ``cat`` takes 0.4 ms), the voxels beyond the array's edge set to 0."""
        data = np.empty(self.chunks, self.array.dtype)
        path = chunk_file(self.array, index)
        try:
            with open(path, "rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                view, got = data.reshape(-1).view(np.uint8).data, 0
                while size == data.nbytes and got < size and (count := file.readinto(view[got:])):
                    got += count
        except FileNotFoundError:
            data[...] = 0  # never written: all fill value, which is 0 (a layout scroll_to_ome writes)
            return data
        if size != data.nbytes or got != size:  # (a file cut short while it was read has ``got`` bytes)
            raise _damaged_file(path, f"{size if size != data.nbytes else got} bytes, not {data.nbytes}")
        for axis, part in enumerate(region):  # an edge chunk: what its writer left beyond the edge counts as 0
            data[(slice(None),) * axis + (slice(part.stop - part.start, None),)] = 0
        return data

    def _decode(self, index: ChunkIndex, region: tuple[slice, ...]) -> np.ndarray:
        """Chunk ``index`` read through zarr (any format, codec and sharding): the voxels in ``region``."""
        if self._framed is not None:
            _check_frame(self._framed, index)
        # not get_block_selection: in a sharded array its blocks are shards, not array.chunks
        try:
            return np.ascontiguousarray(self.array[region])
        except Exception as error:  # zarr and its codecs raise many kinds for a chunk they cannot decode
            if isinstance(error, ScrollzarrError | MemoryError):
                raise  # a remote volume that could not be fetched says so itself
            if isinstance(error, OSError) and not isinstance(error, gzip.BadGzipFile):
                raise  # the disk or the machine, not the chunk: reported as such (gzip's bad bytes are an OSError)
            damage = _damage(self.array, index, error)
            if damage is None:
                raise
            raise damage from None


def _raw(array: zarr.Array) -> bool:
    """Whether ``array``'s chunk files hold its voxels as they are, whole chunks each: a local, unsharded array
    without codecs but the plain bytes (little-endian, C order) and with a fill value of 0, as the published
    scroll volumes are."""
    if not isinstance(array.store, LocalStore) or array.shards is not None or array.compressors or array.filters:
        return False
    metadata: dict[str, Any] = array.metadata.to_dict()
    if metadata.get("fill_value") not in (0, 0.0) or np.dtype(array.dtype).byteorder == ">":
        return False
    if metadata.get("zarr_format") == 2:
        return metadata.get("order", "C") == "C"
    codecs = list(metadata.get("codecs", ()))
    return (
        len(codecs) == 1
        and codecs[0].get("name") == "bytes"
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
    )


def _framed(array: zarr.Array) -> SinkSpec | None:
    """What checking the framing of ``array``'s chunk files needs, for a local, compressed, unsharded array in a
    layout scroll_to_ome writes; ``None`` for any other (raw chunks fail zarr's size check, a cut shard its
    index's checksum)."""
    if not isinstance(array.store, LocalStore) or array.shards is not None or not array.compressors:
        return None
    try:
        return sink_spec(array)
    except UnsupportedLayout:
        return None


def _check_frame(spec: SinkSpec, index: ChunkIndex) -> None:
    """Refuse chunk ``index`` if its file's framing says it is cut short (a few bytes read).

    blosc decodes a chunk cut short without an error, from bytes past its end
    (numcodecs does not check the header's sizes against the buffer): without
    this check a damaged store would render as garbage.
    """
    assert isinstance(spec.directory, Path)  # a volume on disk (sink_spec)
    path = spec.directory / spec.layout.chunk_key(index)
    problem = damage(path, spec) if path.is_file() else None
    if problem is not None:
        raise _damaged_file(path, problem)


def _damaged_file(path: Path, problem: str) -> DamagedChunkError:
    """The error for chunk file ``path`` of a volume on disk, damaged as ``problem`` says."""
    return DamagedChunkError(
        f"chunk file {path} of the volume is damaged ({problem}); convert the volume again with scroll_to_ome"
    )


def _damage(array: zarr.Array, index: ChunkIndex, error: Exception) -> DamagedChunkError | None:
    """The damaged file that reading chunk ``index`` of ``array`` (a store on disk) failed on with ``error``,
    as an error naming it; ``None`` for an uncompressed chunk file of the right size (the failure is not the
    file's).

    A sharded array's chunk lies in its shard's file (``c/i/j/k``, with the shard's index at the end); a
    compressed chunk has no size to check, only its decoding to fail.
    """
    advice = "convert the volume again with scroll_to_ome"
    why = f"{type(error).__name__}: {error}"
    if not isinstance(array.store, LocalStore):
        return DamagedChunkError(
            f"chunk {index} (z, y, x) of the volume {array.store} cannot be decoded ({why}); the volume on the server "
            "is damaged, or an object in the disk cache (--cache_dir) is: remove the cache and render again"
        )
    if array.shards is not None:
        shard = tuple(i * c // s for i, c, s in zip(index, array.chunks, array.shards, strict=True))
        return DamagedChunkError(
            f"shard file {chunk_file(array, shard)} of the volume is damaged: its chunk {index} (z, y, x) "
            f"cannot be decoded ({why}); {advice}"
        )
    path = chunk_file(array, index)
    if array.compressors or array.filters:
        return DamagedChunkError(f"chunk file {path} of the volume is damaged: it cannot be decoded ({why}); {advice}")
    size, whole = path.stat().st_size, chunk_nbytes(array)
    if size == whole:
        return None
    return _damaged_file(path, f"{size} bytes, not {whole}")
