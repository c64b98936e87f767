"""Compressed and sharded units written in two steps: chunks prepared on the workers, files assembled in order
on the writer threads (scrollzarr.streaming.LevelStream._write_group).

Each layout is converted by the real script with three workers (the two-step path) and with one (every unit
written whole by one thread); the stores must be the same file for file, and every level read back by zarr
must equal tests/reference.py's pyramid of the stack.  The shard layouts include a shard wider than every
level (one unit a row: fewer units than workers) and inner chunks smaller than a 4096-byte block.  A write
that fails leaves no temporary file and no task running, and the buffer pool never makes more than its
bound.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from scrollzarr.layout import StoreLayout
from scrollzarr.sinks import CheckedSink, SinkSpec, open_sink, pooled
from scrollzarr.streaming import BufferPool, LevelStream, pool_buffers
from scrollzarr.workers import Workers

from conftest import assert_ok, scroll_to_ome, store_files, write_stack
from reference import pyramid

SHAPE = (45, 83, 101)  # z, y, x: no axis a multiple of a chunk or a shard
NLEVELS = 3
LAYOUTS = {
    "blosc-zstd chunks": ["--compressor", "blosc-zstd", "--chunk_size", 16],
    "gzip chunks, zarr 3": ["--zarr_format", 3, "--compressor", "gzip", "--chunk_size", 16],
    "blosc-lz4 flat shards": ["--zarr_format", 3, "--compressor", "blosc-lz4", "--chunk_size", 16],
    "uncompressed shard wider than every level": ["--zarr_format", 3, "--chunk_size", 16],
    "zstd shards of chunks under a block": ["--zarr_format", 3, "--compressor", "zstd", "--chunk_size", 8],
}
SHARDS = {
    "blosc-lz4 flat shards": "16,32,48",
    "uncompressed shard wider than every level": "16,128,128",
    "zstd shards of chunks under a block": "16,16,24",
}


def make_volume() -> np.ndarray:
    """Noise (incompressible), a smooth ramp (short encoded chunks) and all-zero regions: whole zero chunks,
    zero shards, and zero inner chunks beside non-zero ones."""
    rng = np.random.default_rng(31)
    volume = rng.integers(1, 65535, size=SHAPE, dtype=np.uint16)
    z, y, x = np.indices(SHAPE)
    volume[:, :, 60:] = ((z + 2 * y + 3 * x) % 251 + 1)[:, :, 60:].astype(np.uint16)
    volume[:, :32, :48] = 0
    volume[:16, 40:, :] = 0
    return volume


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, np.ndarray]:
    directory = tmp_path_factory.mktemp("pooled") / "slices"
    volume = make_volume()
    write_stack(directory, volume)
    return directory, volume


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_step_writes_store_the_same_files_as_one_thread(tmp_path, stack, name):
    directory, volume = stack
    args = [*LAYOUTS[name], "--nlevels", NLEVELS]
    if name in SHARDS:
        args += ["--shard_shape", SHARDS[name]]
    stores = {}
    for workers in (1, 3):
        store = tmp_path / f"w{workers}" / "out.zarr"
        assert_ok(scroll_to_ome(directory, store, *args, "--workers", workers, "--quiet"))
        stores[workers] = store
    assert store_files(stores[3]) == store_files(stores[1])
    group = zarr.open_group(str(stores[3]), mode="r")
    for level, expected in enumerate(pyramid(volume, NLEVELS)):
        np.testing.assert_array_equal(group[str(level)][...], expected, err_msg=f"level {level}")


def test_a_band_narrower_than_the_plane_gives_the_same_files(tmp_path, stack):
    """Under --max_gb the units of a band's row are fewer (and the streams fewer); same store as one thread."""
    directory, _ = stack
    args = ["--zarr_format", 3, "--compressor", "blosc-zstd", "--chunk_size", 8, "--shard_shape", "8,16,16"]
    args += ["--nlevels", NLEVELS, "--max_gb", 0.004, "--quiet"]
    stores = [tmp_path / f"w{workers}" / "out.zarr" for workers in (1, 3)]
    for workers, store in zip((1, 3), stores, strict=True):
        assert_ok(scroll_to_ome(directory, store, *args, "--workers", workers))
    assert store_files(stores[1]) == store_files(stores[0])


def test_a_failed_unit_leaves_no_file_and_no_task(tmp_path):
    """The level's directory cannot be made (a file is in its place): the write raises out of the commit,
    after every preparation has finished, and no temporary file is left."""
    layout = StoreLayout(zarr_format=3, chunk=8, shard=(8, 32, 32), compressor="blosc-zstd")
    shape = (8, 64, 64)
    level = tmp_path / "level"
    level.mkdir()
    (level / "c").write_bytes(b"in the way")  # zarr 3 keys are c/z/y/x
    sink = open_sink(SinkSpec(level, shape, "uint16", layout))
    with Workers(3, writers=True) as workers:
        stream = LevelStream(
            (0, 8), (0, 64), (0, 64), np.dtype("uint16"), (8, 32, 32), "mean", sink, None, workers, print
        )
        assert stream.pool is not None
        view = stream.reserve(8)
        view[...] = np.arange(view.size, dtype=np.uint16).reshape(view.shape) + 1
        with pytest.raises(OSError):
            stream.commit(8)
        assert stream.pool.made <= stream.pool.limit
        assert len(stream.pool.free) == stream.pool.made  # every buffer given back: no preparation still running
    assert sorted(p.name for p in level.rglob("*")) == ["c"]


def test_the_pool_never_makes_more_buffers_than_its_bound():
    pool = BufferPool(4096, pool_buffers(2))
    assert pool.limit == 5
    held = [pool.take(3), pool.take(3)]
    assert [len(buffers) for buffers in held] == [3, 2]  # the bound: 5
    assert all(buffer.ctypes.data % 4096 == 0 and buffer.nbytes == 4096 for buffers in held for buffer in buffers)
    taken: list[list[np.ndarray]] = []
    waiter = threading.Thread(target=lambda: taken.append(pool.take(2)))
    waiter.start()
    time.sleep(0.2)
    assert not taken  # none free: waits
    pool.give(held.pop())
    waiter.join(5)
    assert [len(buffers) for buffers in taken] == [2]
    assert pool.made == 5


@pytest.mark.parametrize("fails", [False, True])
def test_a_shard_taller_than_a_stripe_is_written_as_its_rows_arrive_and_given_up_when_reading_fails(tmp_path, fails):
    """One shard as high as the plane: its first chunk rows are prepared while later rows are still being read
    (buffers are taken before the fill reaches the last stripe).  A fill that fails there stops the write
    group waiting for rows (no hang), raises the fill's error, and leaves no file."""
    layout = StoreLayout(zarr_format=3, chunk=8, shard=(8, 64, 64), compressor="blosc-lz4")
    shape = (8, 64, 64)
    volume = np.random.default_rng(5).integers(1, 65535, size=shape, dtype=np.uint16)
    level = tmp_path / "level"
    layout.create_array(str(level), None, shape, np.dtype("uint16"))
    sink = open_sink(SinkSpec(level, shape, "uint16", layout))
    seen: list[int] = []
    with Workers(2, writers=True) as workers:
        stream = LevelStream(
            (0, 8), (0, 64), (0, 64), np.dtype("uint16"), (8, 64, 64), "mean", sink, None, workers, int
        )
        assert stream.pool is not None
        pool = stream.pool
        view = stream.reserve(8)

        def fill(r0: int, r1: int) -> None:
            if r0 == 56:  # the last stripe of 8 rows: the group has been preparing the rows above meanwhile
                deadline = time.monotonic() + 10
                while pool.made == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen.append(pool.made)
                if fails:
                    raise ValueError("slice unreadable")
            view[:, r0:r1] = volume[:, r0:r1]

        if fails:
            with pytest.raises(ValueError, match="unreadable"):
                stream.commit(8, fill, stripe=64)
        else:
            stream.commit(8, fill, stripe=64)
        assert len(pool.free) == pool.made  # every buffer given back
    assert seen and seen[0] > 0
    if fails:
        assert [p for p in level.rglob("*") if p.is_file() and p.name != "zarr.json"] == []
    else:
        np.testing.assert_array_equal(zarr.open_array(str(level), mode="r")[...], volume)


@pytest.mark.parametrize(
    ("layout", "on_writer"),
    [
        (StoreLayout(chunk=8), True),  # uncompressed chunks: the writer thread waits for the disk
        (StoreLayout(chunk=8, compressor="blosc-zstd"), False),  # encoded: on the one worker, not beside it
        (StoreLayout(zarr_format=3, chunk=8, shard=(8, 16, 16)), False),
    ],
)
def test_with_one_worker_only_uncompressed_chunks_are_written_on_a_writer_thread(tmp_path, layout, on_writer):
    """--workers 1 (and a Dask task of one thread) is one core of work: a unit that is encoded or assembled
    from chunks is written in the calling thread, an uncompressed chunk, which mostly waits for the disk, on
    the writer thread.  The level written is the volume either way."""
    shape = (8, 32, 32)
    volume = np.random.default_rng(7).integers(1, 65535, size=shape, dtype=np.uint16)
    level = tmp_path / "level"
    layout.create_array(str(level), None, shape, np.dtype("uint16"))
    sink = open_sink(SinkSpec(level, shape, "uint16", layout))
    threads: set[str] = set()
    write = sink.write

    def spy(corner, piece):
        threads.add(threading.current_thread().name)
        return write(corner, piece)

    sink.write = spy  # type: ignore[method-assign]
    with Workers(1, writers=True) as workers:
        stream = LevelStream(
            (0, 8), (0, 32), (0, 32), np.dtype("uint16"), layout.unit, "mean", sink, None, workers, int
        )
        view = stream.reserve(8)
        view[...] = volume
        stream.commit(8)
    caller = threading.current_thread().name
    assert threads == ({name for name in threads if name.startswith("scrollzarr-write")} if on_writer else {caller})
    assert threads and (caller not in threads) == on_writer
    np.testing.assert_array_equal(zarr.open_array(str(level), mode="r")[...], volume)


def test_a_checked_sink_keeps_the_two_step_writes_and_checks_before_every_unit(tmp_path):
    """A Dask task's sink checks its run's fence before each unit (CheckedSink); compressed units still go the
    two-step way with several workers, and a check that fails stops the writing before the unit."""
    layout = StoreLayout(chunk=8, compressor="blosc-zstd")
    shape = (8, 32, 32)
    volume = np.random.default_rng(9).integers(1, 65535, size=shape, dtype=np.uint16)
    level = tmp_path / "level"
    layout.create_array(str(level), None, shape, np.dtype("uint16"))
    checks: list[int] = []
    sink = CheckedSink(open_sink(SinkSpec(level, shape, "uint16", layout)), lambda: checks.append(1))
    assert pooled(sink) is not None
    with Workers(2, writers=True) as workers:
        stream = LevelStream(
            (0, 8), (0, 32), (0, 32), np.dtype("uint16"), layout.unit, "mean", sink, None, workers, int
        )
        assert stream.pooled is not None
        view = stream.reserve(8)
        view[...] = volume
        stream.commit(8)
    assert len(checks) == 16  # 4 x 4 units of 8 x 8 x 8
    np.testing.assert_array_equal(zarr.open_array(str(level), mode="r")[...], volume)

    def refuse() -> None:
        raise RuntimeError("the store was replaced")

    other = tmp_path / "other"
    layout.create_array(str(other), None, shape, np.dtype("uint16"))
    sink = CheckedSink(open_sink(SinkSpec(other, shape, "uint16", layout)), refuse)
    with Workers(2, writers=True) as workers:
        stream = LevelStream(
            (0, 8), (0, 32), (0, 32), np.dtype("uint16"), layout.unit, "mean", sink, None, workers, int
        )
        view = stream.reserve(8)
        view[...] = volume
        with pytest.raises(RuntimeError, match="replaced"):
            stream.commit(8)
    assert sorted(p.name for p in other.rglob("*") if p.is_file()) == [".zarray", ".zattrs"]  # no chunk file
