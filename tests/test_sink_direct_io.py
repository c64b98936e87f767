"""Compressed chunks and shards written with direct I/O from an aligned buffer read back as written.

The sinks gather encoded bytes of any length in a page-aligned buffer, write
whole 4096-byte blocks, pad the last and cut the file to its size. zarr reads
each array back (a shard's index is found from the file's end, so a file left
padded or cut short fails its checksum) and the voxels are compared with the
array that was written.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest
import zarr

from scrollzarr.layout import StoreLayout
from scrollzarr.sinks import SinkSpec, open_sink

# (z, y, x): not a whole number of units, so the far units are clipped
SHAPE = (40, 52, 36)


def volume(dtype: str) -> np.ndarray:
    """Noise (incompressible: encoded chunks longer than raw), a smooth ramp (short ones) and an all-zero slab."""
    rng = np.random.default_rng(13)
    info = np.iinfo(dtype)
    data = rng.integers(0, info.max, SHAPE, dtype=dtype, endpoint=True)
    z, y, x = np.indices(SHAPE)
    data[:, :, 18:] = ((z + y + x) % 97)[:, :, 18:].astype(dtype)
    data[16:32, :16, :16] = 0
    return data


def write_level(path, layout: StoreLayout, data: np.ndarray) -> int:
    """Create the array with ``layout`` and write every unit of ``data`` through its sink; units stored."""
    layout.create_array(str(path), None, data.shape, data.dtype)
    sink = open_sink(SinkSpec(path, data.shape, data.dtype.name, layout))
    stored = 0
    for corner in product(*(range(0, n, u) for n, u in zip(data.shape, sink.unit, strict=True))):
        region = tuple(slice(c, c + u) for c, u in zip(corner, sink.unit, strict=True))
        stored += sink.write(corner, data[region])
    return stored


LAYOUTS = [
    StoreLayout(chunk=16, compressor="blosc-zstd", clevel=3),
    StoreLayout(chunk=16, compressor="blosc-lz4"),
    StoreLayout(chunk=16, compressor="zstd"),
    StoreLayout(chunk=8, compressor="gzip"),
    StoreLayout(zarr_format=3, chunk=16, compressor="blosc-zstd"),
    StoreLayout(zarr_format=3, chunk=16, shard=(16, 32, 32), compressor="blosc-zstd", clevel=3),
    StoreLayout(zarr_format=3, chunk=16, shard=(16, 64, 64), compressor="blosc-lz4"),
    StoreLayout(zarr_format=3, chunk=8, shard=(16, 16, 16), compressor="zstd"),
    StoreLayout(zarr_format=3, chunk=8, shard=(8, 16, 24), compressor="gzip"),
    # uncompressed inner chunks of whole blocks (16^3 uint16: 8 KiB) and of less (8^3 uint16: 1 KiB)
    StoreLayout(zarr_format=3, chunk=16, shard=(16, 32, 32)),
    StoreLayout(zarr_format=3, chunk=8, shard=(8, 16, 16)),
]


@pytest.mark.parametrize("dtype", ["uint16", "uint8"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.describe())
def test_units_read_back_as_written(tmp_path, layout, dtype):
    data = volume(dtype)
    path = tmp_path / "level"
    stored = write_level(path, layout, data)
    assert np.array_equal(zarr.open_array(str(path), mode="r")[...], data)
    chunks = np.array(SHAPE) // layout.chunk + (np.array(SHAPE) % layout.chunk > 0)
    blocks = [
        data[z : z + layout.chunk, y : y + layout.chunk, x : x + layout.chunk]
        for z, y, x in product(*(range(0, n * layout.chunk, layout.chunk) for n in chunks))
    ]
    assert stored == sum(bool(block.any()) for block in blocks)
    assert not list(path.rglob("*.partial"))


@pytest.mark.parametrize("compressor", ["blosc-zstd", "blosc-lz4", "zstd", "gzip"])
def test_chunk_files_hold_exactly_the_codecs_bytes(tmp_path, compressor):
    """Each chunk file is numcodecs' encoding of the zero-padded chunk, byte for byte (gzip's time of writing
    aside): no padding left."""
    layout = StoreLayout(chunk=16, compressor=compressor)
    data = volume("uint16")
    path = tmp_path / "level"
    write_level(path, layout, data)
    codec = layout.codec(data.dtype)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files
    for file in files:
        z, y, x = (int(part) * 16 for part in file.relative_to(path).parts)
        padded = np.zeros((16, 16, 16), data.dtype)
        block = data[z : z + 16, y : y + 16, x : x + 16]
        padded[: block.shape[0], : block.shape[1], : block.shape[2]] = block
        expected = bytearray(codec.encode(padded))
        if compressor == "gzip":  # ours carry no time of writing (RFC 1952's MTIME, bytes 4-7, 0): reproducible
            expected[4:8] = bytes(4)
        assert file.read_bytes() == bytes(expected), file
