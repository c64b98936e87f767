"""The raw chunk sink: direct I/O where the file system allows it, ordinary writes where it does not,
and in both cases exactly the chunk files zarr reads back."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from scrollzarr import sinks as sinks_module
from scrollzarr.layout import StoreLayout
from scrollzarr.sinks import SinkSpec, open_sink

from conftest import direct_io_allowed

O_DIRECT = getattr(os, "O_DIRECT", 0)


def is_direct(flags: int) -> bool:
    return bool(O_DIRECT and flags & O_DIRECT)


class OpenSpy:
    """Records the flags of every ``os.open`` of a chunk's temporary file; may refuse O_DIRECT."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_direct: bool = False) -> None:
        self.flags: list[int] = []
        self.refused = 0
        real_open = os.open

        def spy(path, flags, *args, **kwargs):
            if str(path).endswith(".partial"):
                self.flags.append(flags)
                if refuse_direct and is_direct(flags):
                    self.refused += 1
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(sinks_module.os, "open", spy)


def create_level(path: Path, shape: tuple[int, int, int], chunk: int, dtype: np.dtype) -> zarr.Array:
    """A plain uncompressed zarr 2 array at ``path``, as the default store's levels."""
    return StoreLayout(chunk=chunk).create_array(str(path), None, shape, dtype)


def write_all_chunks(array: zarr.Array, volume: np.ndarray) -> int:
    """Write ``volume`` chunk by chunk through the array's sink (the far chunks short); the files written."""
    chunk = array.chunks[0]
    writer = open_sink(SinkSpec(Path(array.store.root), volume.shape, str(array.dtype), StoreLayout(chunk=chunk)))
    written = 0
    for z in range(0, volume.shape[0], chunk):
        for y in range(0, volume.shape[1], chunk):
            for x in range(0, volume.shape[2], chunk):
                written += writer.write((z, y, x), volume[z : z + chunk, y : y + chunk, x : x + chunk])
    return written


def sparse_volume(rng: np.random.Generator, shape: tuple[int, int, int], chunk: int, dtype) -> np.ndarray:
    volume = rng.integers(1, 60000, size=shape).astype(dtype)
    volume[:chunk, :chunk, :chunk] = 0  # one all-zero chunk, never written
    return volume


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_chunks_go_straight_to_disk_where_allowed_and_read_back_exactly(tmp_path, rng, monkeypatch, dtype):
    # 16^3 voxels of 2 or 1 bytes: 8192 or 4096 bytes, whole blocks of 4096 bytes; the far chunks are padded
    volume = sparse_volume(rng, (40, 33, 20), 16, dtype)
    array = create_level(tmp_path / "level.zarr", volume.shape, 16, np.dtype(dtype))
    spy = OpenSpy(monkeypatch)
    written = write_all_chunks(array, volume)
    monkeypatch.undo()
    assert written == 3 * 3 * 2 - 1
    assert len(spy.flags) == written
    uses_direct = [is_direct(flags) for flags in spy.flags]
    assert all(uses_direct) == direct_io_allowed(tmp_path) and len(set(uses_direct)) == 1
    assert not (tmp_path / "level.zarr" / "0" / "0" / "0").exists()
    assert not list((tmp_path / "level.zarr").rglob("*.partial"))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "level.zarr"), mode="r")[...], volume)
    padded = np.zeros((16, 16, 16), dtype)
    padded[:8, :, :4] = volume[32:40, 16:32, 16:20]
    expected = padded.astype(padded.dtype.newbyteorder("<")).tobytes()
    assert (tmp_path / "level.zarr" / "2" / "1" / "1").read_bytes() == expected


def test_a_file_system_that_refuses_direct_io_gets_ordinary_writes(tmp_path, rng, monkeypatch):
    volume = sparse_volume(rng, (32, 32, 48), 16, np.uint16)
    array = create_level(tmp_path / "level.zarr", volume.shape, 16, np.dtype(np.uint16))
    spy = OpenSpy(monkeypatch, refuse_direct=True)
    written = write_all_chunks(array, volume)
    monkeypatch.undo()
    assert written == 2 * 2 * 3 - 1
    assert spy.refused == (1 if O_DIRECT else 0)  # refused once, then never asked again
    assert sum(1 for flags in spy.flags if not is_direct(flags)) == written
    assert not list((tmp_path / "level.zarr").rglob("*.partial"))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "level.zarr"), mode="r")[...], volume)


def test_chunks_of_part_blocks_are_written_through_the_page_cache(tmp_path, rng, monkeypatch):
    # 10^3 bytes is no whole number of 4096-byte blocks: direct I/O is not even tried
    volume = sparse_volume(rng, (20, 20, 25), 10, np.uint8)
    array = create_level(tmp_path / "level.zarr", volume.shape, 10, np.dtype(np.uint8))
    spy = OpenSpy(monkeypatch)
    written = write_all_chunks(array, volume)
    monkeypatch.undo()
    assert written == 2 * 2 * 3 - 1
    assert not any(is_direct(flags) for flags in spy.flags)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "level.zarr"), mode="r")[...], volume)
